#!/usr/bin/env bash
# Run pip (for `pip download`) whatever python3 is: the first of
#   python3 -m pip            a system or CI Python, which ships pip
#   <base of python3> -m pip  under nox, python3 is the shared .venv's, which uv creates without
#                             pip: the interpreter that venv was made from
#   /usr/bin/python3 -m pip   the distribution's Python (Debian: python3-pip)
#   uv tool run --from pip    pip fetched by uv (pinned), where no interpreter has it
# Usage: scripts/pip.sh ARGS...      (e.g. scripts/pip.sh download --no-deps -d DIR pkg==1.0)
#        scripts/pip.sh --which      print the command it would run, exit 1 if none
set -euo pipefail
PIP_VERSION=25.3
candidates=(python3)
if command -v python3 >/dev/null; then
    candidates+=("$(python3 -c 'import sys; print(sys.base_prefix)')/bin/python3")
fi
candidates+=(/usr/bin/python3)
pip=()
for py in "${candidates[@]}"; do
    if "$py" -m pip --version >/dev/null 2>&1; then
        pip=("$py" -m pip)
        break
    fi
done
if [[ ${#pip[@]} -eq 0 ]] && command -v uv >/dev/null; then
    pip=(uv tool run --quiet --python 3.11 --from "pip==$PIP_VERSION" pip)
fi
if [[ ${#pip[@]} -eq 0 ]]; then
    echo "pip: none found (python3 -m pip, its base interpreter, /usr/bin/python3, uv)" >&2
    exit 1
fi
if [[ "${1:-}" == "--which" ]]; then
    echo "${pip[*]}"
    exit 0
fi
exec "${pip[@]}" "$@"
