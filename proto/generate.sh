#!/bin/sh
# Regenerate envd's Python stubs (src/sandboxd/envd/rpc/) from proto/*.
#
# Why a script: the generated files are committed, and anyone changing a .proto must produce the
# exact same layout the SDK's own stubs have (protoc-gen-py for messages, protoc-gen-connectrpc for
# the Connect server/client). The code generators are build-time tools, so they live in a throwaway
# venv, never in the project's dependencies.
#
# Needs: protoc (Debian: apt-get install -y protobuf-compiler).
# Env:   CODEGEN_VENV (default /tmp/sandboxd-codegen) is created on first use.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out="$here/../src/sandboxd/envd/rpc"
venv=${CODEGEN_VENV:-/tmp/sandboxd-codegen}

command -v protoc >/dev/null || { echo "protoc not found: apt-get install -y protobuf-compiler" >&2; exit 1; }
if [ ! -x "$venv/bin/protoc-gen-py" ] || [ ! -x "$venv/bin/protoc-gen-connectrpc" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q protoc-gen-py==0.6.0 protobuf-py==0.6.0 protoc-gen-connectrpc==0.12.1
fi

rm -rf "$out/process" "$out/filesystem"
mkdir -p "$out"
cd "$here"
protoc -I . \
  --plugin=protoc-gen-py="$venv/bin/protoc-gen-py" --py_out="$out" \
  --plugin=protoc-gen-connectrpc="$venv/bin/protoc-gen-connectrpc" --connectrpc_out="$out" \
  process/process.proto filesystem/filesystem.proto
[ -f "$out/__init__.py" ] || echo '"""Generated Connect RPC stubs for envd (see proto/generate.sh)."""' > "$out/__init__.py"
echo "generated into $out:"
find "$out" -name '*.py' | sort
