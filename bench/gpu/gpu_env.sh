# Sourced by bench/gpu.sh (and usable alone): make this checkout runnable on a GPU machine
# that has Python 3.12 and PyTorch but no internet. Installs the wheels carried in .whl/
# into /tmp/site, puts them first on PYTHONPATH, and generates vpm/ if it is absent.
#
#   source bench/gpu/gpu_env.sh && "$python" -m pytest tests/encoder/test_gpu_pipeline.py
python="${PYTHON:-python3}"
# Here (a development checkout) the project's virtual environment, when there is one.
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
site=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$python" -m pip --version >/dev/null 2>&1; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl
    else  # a wheel is a zip laid out for site-packages
        echo "gpu.sh: no pip here; unpacking the wheels into $site"
        "$python" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$site" .whl/*.whl
    fi
else
    echo "gpu.sh: no wheels in .whl/ (bash bench/gpu/gpu_wheels.sh makes them); using what is installed"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Our protobuf must win over the machine's. If the machine's `google` is a regular
# package (an old protobuf's google/__init__.py), it hides our namespace portion,
# unless ours is made a regular package too, found first on the path.
ours() { "$python" -c "import google.protobuf as p, sys; sys.exit(p.__file__.find('$site') != 0)"; }
if [ -d "$site/google/protobuf" ] && ! ours; then
    touch "$site/google/__init__.py"
    ours || echo "gpu.sh: warning: the machine's protobuf still comes first"
fi

if [ ! -f vpm/v1/encoder_pb2_grpc.py ]; then
    "$python" -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
        protos/vpm/v1/*.proto
fi

