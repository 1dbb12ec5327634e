#!/usr/bin/env bash
# Build the one-folder KV Chat app: dist/kvchat/kvchat (see packaging/README.md).
#
#   bash packaging/build.sh                 # venv .venv, install '.[package]', build, self-test
#   bash packaging/build.sh --no-install    # the venv already has the app and PyInstaller
#   bash packaging/build.sh --no-self-test  # skip running the built app once
#
# Environment: KVCHAT_VENV (default <repo>/.venv, created if missing), PYTHON (creates
# the venv; default python3), KVCHAT_DIST_DIR (default <repo>/dist), KVCHAT_WORK_DIR
# (default <repo>/build/pyinstaller).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KVCHAT_VENV:-$root/.venv}
dist=${KVCHAT_DIST_DIR:-$root/dist}
work=${KVCHAT_WORK_DIR:-$root/build/pyinstaller}
install=1
self_test=1
for arg in "$@"; do
  case $arg in
    --no-install) install=0 ;;
    --no-self-test) self_test=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  echo "+ ${PYTHON:-python3} -m venv $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
python=$venv/bin/python
if [ "$install" = 1 ]; then
  echo "+ pip install -e '.[package]'"
  (cd "$root" && "$python" -m pip install --quiet -e '.[package]')
fi

echo "+ pyinstaller packaging/kvchat.spec -> $dist/kvchat"
"$python" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath "$dist" --workpath "$work" "$root/packaging/kvchat.spec"

app=$dist/kvchat/kvchat
[ -x "$app" ] || { echo "build.sh: $app was not built" >&2; exit 1; }
echo "built $app in $((SECONDS - started)) s; bundle size $(du -sh "$dist/kvchat" | cut -f1)"

if [ "$self_test" = 1 ]; then
  echo "+ $app --self-test"
  QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen} "$app" --self-test
fi
