#!/usr/bin/env bash
# Install a built bundle for the current user so KV Chat starts from the desktop's
# application menu (a double-click on its launcher), or remove it again.
#
#   bash packaging/install.sh [BUNDLE_DIR]   # default BUNDLE_DIR: dist/kvchat
#   bash packaging/install.sh --uninstall
#
# PREFIX (default ~/.local) decides where: PREFIX/lib/kvchat (the bundle),
# PREFIX/bin/kvchat (a symlink), PREFIX/share/{applications,icons,metainfo}.
# The launcher's Exec is rewritten to the absolute path: PREFIX/bin is often not on
# the PATH a desktop session starts programs with.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${PREFIX:-$HOME/.local}
app_id=io.kvchat.KVChat
target=$prefix/lib/kvchat
share=$prefix/share
sizes=(16 24 32 48 64 128 256 512)

refresh_caches() {
  command -v update-desktop-database >/dev/null && update-desktop-database -q "$share/applications" || true
  command -v gtk-update-icon-cache >/dev/null && gtk-update-icon-cache -q -t "$share/icons/hicolor" || true
}

if [ "${1:-}" = "--uninstall" ]; then
  rm -rf "$target"
  rm -f "$prefix/bin/kvchat" "$share/applications/$app_id.desktop" \
    "$share/metainfo/$app_id.metainfo.xml" "$share/icons/hicolor/scalable/apps/$app_id.svg"
  for size in "${sizes[@]}"; do
    rm -f "$share/icons/hicolor/${size}x${size}/apps/$app_id.png"
  done
  refresh_caches
  echo "removed KV Chat from $prefix (chats in the data folder are kept)"
  exit 0
fi

bundle=$(cd "${1:-$root/dist/kvchat}" && pwd)
[ -x "$bundle/kvchat" ] || { echo "install.sh: no kvchat executable in $bundle; run packaging/build.sh" >&2; exit 1; }

mkdir -p "$prefix/bin" "$prefix/lib" "$share/applications" "$share/metainfo" "$share/icons/hicolor/scalable/apps"
rm -rf "$target.new"
cp -a "$bundle" "$target.new"
rm -rf "$target"
mv "$target.new" "$target"
ln -sfn "$target/kvchat" "$prefix/bin/kvchat"

sed -e "s|^Exec=kvchat|Exec=$target/kvchat|" -e "s|^TryExec=kvchat|TryExec=$target/kvchat|" \
  "$root/packaging/$app_id.desktop" > "$share/applications/$app_id.desktop"
cp "$root/packaging/$app_id.metainfo.xml" "$share/metainfo/"
cp "$root/resources/icons/kvchat.svg" "$share/icons/hicolor/scalable/apps/$app_id.svg"
for size in "${sizes[@]}"; do
  mkdir -p "$share/icons/hicolor/${size}x${size}/apps"
  cp "$root/resources/icons/kvchat-$size.png" "$share/icons/hicolor/${size}x${size}/apps/$app_id.png"
done
refresh_caches
echo "installed KV Chat: $target/kvchat, launcher $share/applications/$app_id.desktop"
