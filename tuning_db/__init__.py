"""The shipped tuning database (JSON data only)."""
