# Sourced at the start of every command on the GPU machine: the image has torch, Triton,
# transformers and peft but not optuna (carried as wheels in .whl/, see benchmarks/README.md).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# bitsandbytes (issue 17, 41 MiB) in .bnb/ when carried beside .whl/ (57 MiB together, under the 64 MiB carry)
if ls .bnb/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bnb/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "editable install failed"; exit 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, peft, optuna; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'optuna', optuna.__version__)"
# Whether this torch has ahead-of-time torch.compile artifacts (a lead for issue 15's 5 s warm start)
python3 -c "import torch; f = torch.compile(lambda x: x, fullgraph=True); print('aot_compile', hasattr(f, 'aot_compile'), 'load_compiled_function', hasattr(torch.compiler, 'load_compiled_function'))" 2>/dev/null
