#!/usr/bin/env bash
# Installs the benchmark peers (issue 6): python-socketio into the active Python environment,
# and Node.js Socket.IO + @socket.io/redis-streams-adapter into loadtest/peers/node_modules
# (git-ignored). Needs Node.js >= 18 and npm on PATH.
#
#   bash loadtest/peers/install.sh            # uses `python -m pip` of the python on PATH
#   PYTHON=/tmp/venv/bin/python bash loadtest/peers/install.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac
"$py" -m pip install -q "python-socketio>=5.11,<6" "aiohttp>=3.9,<4" "uvloop>=0.19" "redis>=5"
cd "$here"
if [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund
else
  npm install --no-audit --no-fund
fi
node -e 'require("socket.io"); require("@socket.io/redis-streams-adapter"); require("redis")'
echo "peers installed: $("$py" -c 'import socketio; print("python-socketio", socketio.__version__ if hasattr(socketio, "__version__") else "")'), node $(node --version)"
