#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (its Ubuntu image, 22.04 or 24.04).
# It installs Python and a CPU build of what grading imports into a virtual environment, /autograder/venv, that
# run_autograder uses. tools/make_assignment.py writes this file from the template tools/gradescope/setup.sh,
# with the version ranges of requirements.txt in place of the @...@ names.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends python3 python3-pip python3-venv
VENV="${AUTOGRADER_ROOT:-/autograder}/venv"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --no-cache-dir --upgrade pip
"$VENV/bin/pip" install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu @TORCH@
"$VENV/bin/pip" install --no-cache-dir @PACKAGES@
"$VENV/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
