#!/usr/bin/env bash
# ARM check: install this working tree in an emulated Debian ARM root and compare its answers
# with the host's (.ci/compare_answers.py: same ids, log-likelihoods, PNG bytes).
#
#   sudo bash .ci/arm_check.sh            # arm64: Debian bookworm, `pip install .` (PyPI wheels)
#   sudo bash .ci/arm_check.sh armhf      # armv7: Debian trixie's python3-onnxruntime & co,
#                                             #        `pip install --no-deps .` over system packages
#   ARM_CHECK_CPUS="cortex-a72" ...           # emulated CPUs (default: per arch, see below)
#   ARM_CHECK_CACHE=DIR ...                   # where roots, qemu and the host venv are kept
#
# Needs root on an amd64 Debian (bookworm or later) host with network access to its Debian
# mirror and PyPI. It installs mmdebstrap if missing and registers a qemu-user binfmt handler
# for the run (removed again at exit). qemu comes from bookworm-backports (10.x), unpacked into
# the cache: bookworm's qemu 7.2 shows the guest the host's /proc/cpuinfo and onnxruntime's CPU
# probe crashes on it. The Debian root is built from the mirror this host's apt uses.
# The first run builds and caches the root with its Python dependencies; later runs only
# reinstall the package and rerun the commands.
set -euo pipefail

ARCH="${1:-arm64}"
case "$ARCH" in
    arm64) SUITE=bookworm; QEMU=aarch64; CPUS="${ARM_CHECK_CPUS:-cortex-a72 cortex-a76}"
           PACKAGES="python3,python3-venv,ca-certificates"; VENV_FLAGS=""; PIP_FLAGS="" ;;
    armhf) SUITE=trixie; QEMU=arm; CPUS="${ARM_CHECK_CPUS:-cortex-a7}"
           PACKAGES="python3,python3-venv,ca-certificates,python3-onnxruntime,python3-numpy"
           PACKAGES+=",python3-pil,python3-click,python3-threadpoolctl,python3-tqdm"
           VENV_FLAGS="--system-site-packages"; PIP_FLAGS="--no-deps" ;;
    *) echo "usage: $0 [arm64|armhf]" >&2; exit 2 ;;
esac
QEMU_DEB_SUITE=bookworm-backports
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${ARM_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vae-edge/arm-check}"
ROOT="$CACHE/$SUITE-$ARCH"
OUT="$CACHE/answers-$ARCH"
Z="0.8,-1.5,0.3,2.1,-0.7,0.0,1.2,-2.4,0.5,-0.1,1.9,-1.1,0.6,0.4,-0.9,1.5"
START=$SECONDS

say() { printf '[arm_check %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf 'arm_check: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap, chroot and binfmt_misc need it)"
[ "$(dpkg --print-architecture)" = amd64 ] || die "expects an amd64 Debian host"
mkdir -p "$CACHE" "$OUT"

# The host's Debian mirror, as its apt is configured (sources.list or deb822 .sources).
MIRROR="$(apt-get indextargets --format '$(SITE) $(RELEASE)' 'Created-By: Packages' \
    | awk '$2 !~ /-security$/ {print $1; exit}')"
[ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources.list*; run apt-get update"
say "mirror $MIRROR, $ARCH ($SUITE), CPUs: $CPUS, cache $CACHE"

command -v mmdebstrap >/dev/null || {
    say "installing mmdebstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap arch-test >/dev/null
}

# qemu-user from bookworm-backports, fetched with a private apt state: the host's sources
# and package lists stay as they are.
QEMU_DIR="$CACHE/qemu"
if [ ! -x "$QEMU_DIR/bin/qemu-$QEMU" ]; then
    say "fetching qemu-user from $QEMU_DEB_SUITE"
    apt_dir="$CACHE/apt"
    mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" \
        "$apt_dir/deb" "$QEMU_DIR/bin"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$MIRROR" "$QEMU_DEB_SUITE" /usr/share/keyrings/debian-archive-keyring.gpg \
        > "$apt_dir/parts/backports.sources"
    apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/parts"
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
              -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update -qq
    (cd "$apt_dir/deb" && rm -f ./*.deb && apt-get "${apt_opts[@]}" download -qq \
        "qemu-user/$QEMU_DEB_SUITE")
    tmp="$(mktemp -d)"
    dpkg-deb -x "$apt_dir"/deb/qemu-user_*.deb "$tmp"
    cp "$tmp/usr/bin/qemu-aarch64" "$tmp/usr/bin/qemu-arm" "$QEMU_DIR/bin/"
    cp "$tmp"/usr/share/qemu/binfmt.d/qemu-{aarch64,arm}.conf "$QEMU_DIR/"
    rm -rf "$tmp" "$apt_dir"
fi
"$QEMU_DIR/bin/qemu-$QEMU" --version | head -1

# binfmt_misc: the handler is opened at registration (flag F), so the chroot needs no qemu
# binary of its own. A name ending in -binfmt-P tells qemu that argv[0] is preserved (flag P).
BINFMT=/proc/sys/fs/binfmt_misc
[ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT"
REGISTERED=""
cleanup() { if [ -n "$REGISTERED" ]; then echo -1 > "$BINFMT/qemu-$QEMU"; fi; }
trap cleanup EXIT
if [ -e "$BINFMT/qemu-$QEMU" ]; then
    interpreter="$(awk '/^interpreter/ {print $2}' "$BINFMT/qemu-$QEMU")"
    version="$("$interpreter" --version 2>/dev/null | awk 'NR == 1 {print $3}')" || true
    case "$version" in
        [89].*|[1-9][0-9].*) say "using the host's qemu-$QEMU handler ($version)" ;;
        *) die "the host registers qemu-$QEMU with $interpreter (version '${version:-?}'); \
onnxruntime needs qemu >= 8: install qemu-user-static from $QEMU_DEB_SUITE, or remove the \
handler (echo -1 > $BINFMT/qemu-$QEMU) so that this script registers its own" ;;
    esac
else
    ln -sf "qemu-$QEMU" "$QEMU_DIR/bin/$QEMU-binfmt-P"
    sed -e "s|:/usr/libexec/qemu-binfmt/$QEMU-binfmt-P:.*|:$QEMU_DIR/bin/$QEMU-binfmt-P:OPF|" \
        "$QEMU_DIR/qemu-$QEMU.conf" > "$BINFMT/register"
    REGISTERED=1
fi

# The emulated root: built once per package list; its venv keeps the dependencies between runs.
if [ "$(cat "$ROOT/.root-built" 2>/dev/null)" != "$PACKAGES" ]; then
    rm -rf "$ROOT"
    say "building the $SUITE $ARCH root with mmdebstrap (first run only)"
    mmdebstrap --quiet --mode=root --variant=minbase --arch="$ARCH" --include="$PACKAGES" \
        "$SUITE" "$ROOT" "$MIRROR"
    echo "$PACKAGES" > "$ROOT/.root-built"
fi

# Runs a shell command inside the root, in a private mount namespace (no mount outlives it).
# The root's pip trusts the CA bundle the host's does (networks that inspect TLS add their own).
HOST_CA="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
in_root() {
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp "$HOST_CA" "$ROOT/etc/ssl/host-ca-certificates.crt"
    unshare --mount --fork sh -c '
        mount -t proc proc "$1/proc" && mount --rbind /sys "$1/sys" && mount --rbind /dev "$1/dev" &&
        mount -t tmpfs tmpfs "$1/tmp" && shift && exec chroot "$@"' sh "$ROOT" "$ROOT" \
        env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_CERT=/etc/ssl/host-ca-certificates.crt \
        ${QEMU_CPU:+QEMU_CPU=$QEMU_CPU} \
        sh -ec "$1"
}

# The working tree as git sees it (tracked and untracked, not ignored), for host and guest.
rm -rf "$ROOT/opt/src" "$CACHE/src" && mkdir -p "$ROOT/opt/src" "$CACHE/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf "$CACHE/src.tar" 2>/dev/null)
tar -xf "$CACHE/src.tar" -C "$CACHE/src" && tar -xf "$CACHE/src.tar" -C "$ROOT/opt/src"

[ -x "$ROOT/opt/venv/bin/python" ] || in_root "python3 -m venv $VENV_FLAGS /opt/venv"
say "installing the working tree in the root: pip install $PIP_FLAGS ."
in_root "pip install -q $PIP_FLAGS /opt/src"
VENV_MB="$(du -sm "$ROOT/opt/venv" | cut -f1)"

HOST_VENV="$CACHE/host-venv"
if [ ! -x "$HOST_VENV/bin/vae-run" ]; then
    say "creating the host venv (first run only)"
    python3 -m venv "$HOST_VENV"
fi
say "installing the working tree on the host"
"$HOST_VENV/bin/pip" install -q --disable-pip-version-check "$CACHE/src"

# The commands, run the same way on both sides; each writes its answer to a file.
COMMANDS='
vae-run info --json > info.json
vae-run decode --z "'"$Z"'" -o decoded.png > /dev/null
vae-run nearest --json --z "'"$Z"'" -k 10 > nearest.json
vae-run nearest --json --random --seed 7 --label Sneaker -k 5 > nearest_label.json
vae-run nearest --json --image decoded.png -k 10 > nearest_image.json
'
rm -rf "$OUT" && mkdir -p "$OUT/host"
(cd "$OUT/host" && PATH="$HOST_VENV/bin:$PATH" sh -ec "$COMMANDS")

failed=0
for cpu in $CPUS; do
    say "running the commands on emulated $cpu"
    t0=$SECONDS
    QEMU_CPU="$cpu" in_root "rm -rf /tmp/answers && mkdir /tmp/answers && cd /tmp/answers &&
        $COMMANDS
        vae-run bench --seconds 1 --batch 8 > bench.txt
        tar -cf /opt/answers.tar ."
    mkdir -p "$OUT/$cpu" && tar -xf "$ROOT/opt/answers.tar" -C "$OUT/$cpu"
    say "$cpu: commands took $((SECONDS - t0)) s under emulation"
    "$HOST_VENV/bin/python" "$REPO/.ci/compare_answers.py" "$OUT/host" "$OUT/$cpu" || failed=1
    sed 's/^/    /' "$OUT/$cpu/bench.txt"
done
say "venv in the root: $VENV_MB MB"
if [ "$failed" = 0 ]; then
    say "PASS: $ARCH answers match the host's"
else
    say "FAIL: $ARCH answers differ from the host's (files in $OUT)"
fi
exit "$failed"
