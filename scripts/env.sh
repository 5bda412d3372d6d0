# Sourced by the other scripts: the project root, its virtual environment first on PATH,
# and the settings tch's build needs. Safe to source from an interactive shell too.
REBELD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REBELD_ROOT
export VIRTUAL_ENV="$REBELD_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
