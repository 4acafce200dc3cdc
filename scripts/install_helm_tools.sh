#!/usr/bin/env bash
# Installs the PINNED tools that validate the Helm chart (scripts/helm_check.sh) into a project-local
# directory (default .tools/, gitignored), from package registries only: nothing else is downloaded.
#
#   helm            go install helm.sh/helm/v3/cmd/helm@HELM_VERSION          (Go module proxy)
#   helm-unittest   built from its Go module, installed as a plugin directory under .tools/helm-plugins
#                   with a plugin.yaml pointing at the built binary (no `helm plugin install` from a URL)
#   kubeconform     go install github.com/yannh/kubeconform/cmd/kubeconform@KUBECONFORM_VERSION
#   k8s schemas     the JSON schemas shipped in the PyPI wheel kubernetes-validate (hash-pinned), unpacked
#                   to .tools/k8s-schemas/vX.Y.Z-local-strict/<kind>-<group>-<version>.json
#
# Idempotent: each tool is rebuilt only when its binary is missing or was built for another pin, so a
# second run takes about a second. The first run compiles helm and helm-unittest (several minutes on
# 2 cores; the Go build cache makes later rebuilds fast).
#
# Environment: HELM_TOOLS_DIR (default <repo>/.tools), PYTHON (default <repo>/.venv/bin/python, else python3).
set -euo pipefail

HELM_VERSION=v3.21.3
HELM_UNITTEST_VERSION=v1.1.2
KUBECONFORM_VERSION=v0.8.0
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBERNETES_VALIDATE_SHA256=85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
# Kubernetes versions whose schemas are unpacked (helm_check.sh validates against each).
K8S_SCHEMA_VERSIONS="1.30.0 1.37.0"
# Bumped when the way the schemas are unpacked changes (forces a re-unpack).
SCHEMA_LAYOUT=local-refs-1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${HELM_TOOLS_DIR:-$ROOT/.tools}
BIN=$TOOLS/bin
STAMPS=$TOOLS/stamps
PLUGINS=$TOOLS/helm-plugins
SCHEMAS=$TOOLS/k8s-schemas
LOGS=$TOOLS/logs
mkdir -p "$BIN" "$STAMPS" "$PLUGINS" "$SCHEMAS" "$LOGS"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

export GOTOOLCHAIN=local CGO_ENABLED=0
T0=$SECONDS
say() { printf '[install_helm_tools %3ds] %s\n' "$((SECONDS - T0))" "$*"; }

# up_to_date NAME VERSION FILE...: true when every FILE exists and NAME's stamp says VERSION.
up_to_date() {
  local name=$1 version=$2; shift 2
  local f
  for f in "$@"; do [[ -e "$f" ]] || return 1; done
  [[ -f "$STAMPS/$name" && "$(cat "$STAMPS/$name")" == "$version" ]]
}

need_go() {
  command -v go >/dev/null || { echo "install_helm_tools: building $1 needs the Go toolchain (go >= 1.26) on PATH" >&2; exit 1; }
}

# go_build NAME LOG CMD...: runs a `go install`/`go build -v`, printing a progress line every 25 packages;
# on failure prints the end of the log.
go_build() {
  local name=$1 log=$2; shift 2
  say "building $name (progress: packages downloaded or compiled; full log in ${log#"$ROOT"/})"
  local rc=0
  "$@" 2>&1 | tee "$log" | awk -v name="$name" '{ n++; if (n % 25 == 0) { printf "  %s: %d packages downloaded or compiled...\n", name, n; fflush() } }' || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "  $name: build FAILED (exit $rc); last lines of the log:" >&2
    tail -n 30 "$log" >&2
    exit "$rc"
  fi
}

# Kubernetes version helm reports by default (.Capabilities.KubeVersion, lint deprecations): helm's own
# Makefile derives it from the client-go it is built with (k8s.io/client-go v0.N.x -> 1.N).
helm_k8s_ldflags() {
  local mod minor=""
  mod=$(go env GOMODCACHE)/cache/download/helm.sh/helm/v3/@v/$HELM_VERSION.mod
  if [[ -f "$mod" ]]; then
    minor=$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9][0-9]*\)\..*/\1/p' "$mod" | head -n1)
  fi
  [[ -n "$minor" ]] || minor=36
  local pkg
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    printf -- ' -X %s.k8sVersionMajor=1 -X %s.k8sVersionMinor=%s' "$pkg" "$pkg" "$minor"
  done
}


# --- helm -------------------------------------------------------------------------------------------
if up_to_date helm "$HELM_VERSION" "$BIN/helm"; then
  say "helm $HELM_VERSION: already installed"
else
  need_go helm
  say "helm $HELM_VERSION: downloading the module"
  go mod download "helm.sh/helm/v3@$HELM_VERSION"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION$(helm_k8s_ldflags)"
  go_build "helm $HELM_VERSION" "$LOGS/helm.log" \
    env GOBIN="$BIN" go install -v -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" > "$STAMPS/helm"
  say "helm: $("$BIN/helm" version --short)"
fi

# --- helm-unittest (plugin) -----------------------------------------------------------------------
# Its go.mod has a replace directive, so `go install module@version` refuses it: build it from a
# writable copy of the module source (downloaded through the Go module proxy) instead.
UNITTEST_DIR=$PLUGINS/unittest
if up_to_date helm-unittest "$HELM_UNITTEST_VERSION" "$UNITTEST_DIR/untt" "$UNITTEST_DIR/plugin.yaml"; then
  say "helm-unittest $HELM_UNITTEST_VERSION: already installed"
else
  need_go helm-unittest
  say "helm-unittest $HELM_UNITTEST_VERSION: downloading the module"
  src_ro=$(go mod download -json "github.com/helm-unittest/helm-unittest@$HELM_UNITTEST_VERSION" \
           | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d "$src_ro" ]] || { echo "install_helm_tools: could not download helm-unittest" >&2; exit 1; }
  src=$TOOLS/src/helm-unittest-$HELM_UNITTEST_VERSION
  rm -rf "$src" && mkdir -p "$TOOLS/src" && cp -r "$src_ro" "$src" && chmod -R u+w "$src"
  ldflags="-s -w -X github.com/helm-unittest/helm-unittest/internal/build.version=${HELM_UNITTEST_VERSION#v}"
  ldflags+=$(helm_k8s_ldflags | sed 's/ -X helm.sh\/helm\/v3\/pkg\/lint\/rules[^ ]*//g')
  mkdir -p "$UNITTEST_DIR"
  (cd "$src" && go_build "helm-unittest $HELM_UNITTEST_VERSION" "$LOGS/helm-unittest.log" \
    go build -v -trimpath -ldflags "$ldflags" -o "$UNITTEST_DIR/untt" ./cmd/helm-unittest)
  # The upstream plugin.yaml, minus its install hooks (they download a release binary) and with one
  # command: the binary built above.
  cat > "$UNITTEST_DIR/plugin.yaml" <<EOF
name: "unittest"
version: "${HELM_UNITTEST_VERSION#v}"
usage: "unittest for helm charts"
description: "Unit test for helm chart in YAML with ease to keep your chart functional and robust (built from source by scripts/install_helm_tools.sh)."
ignoreFlags: false
command: "\$HELM_PLUGIN_DIR/untt"
EOF
  cp "$src/LICENSE" "$UNITTEST_DIR/LICENSE"
  rm -rf "$src"
  echo "$HELM_UNITTEST_VERSION" > "$STAMPS/helm-unittest"
  say "helm-unittest: plugin installed in ${UNITTEST_DIR#"$ROOT"/}"
fi

# --- kubeconform ------------------------------------------------------------------------------------
if up_to_date kubeconform "$KUBECONFORM_VERSION" "$BIN/kubeconform" \
   && [[ "$("$BIN/kubeconform" -v)" == "$KUBECONFORM_VERSION" ]]; then
  say "kubeconform $KUBECONFORM_VERSION: already installed"
else
  need_go kubeconform
  go_build "kubeconform $KUBECONFORM_VERSION" "$LOGS/kubeconform.log" \
    env GOBIN="$BIN" go install -v -trimpath -ldflags "-s -w -X main.version=$KUBECONFORM_VERSION" \
    "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  echo "$KUBECONFORM_VERSION" > "$STAMPS/kubeconform"
  say "kubeconform: $("$BIN/kubeconform" -v)"
fi

# --- Kubernetes JSON schemas ----------------------------------------------------------------------
schema_dirs=()
for v in $K8S_SCHEMA_VERSIONS; do schema_dirs+=("$SCHEMAS/v$v-local-strict/deployment-apps-v1.json"); done
if up_to_date k8s-schemas "$KUBERNETES_VALIDATE_VERSION $K8S_SCHEMA_VERSIONS $SCHEMA_LAYOUT" "${schema_dirs[@]}"; then
  say "Kubernetes schemas (kubernetes-validate $KUBERNETES_VALIDATE_VERSION: $K8S_SCHEMA_VERSIONS): already unpacked"
else
  say "Kubernetes schemas: pip download kubernetes-validate==$KUBERNETES_VALIDATE_VERSION (hash-pinned)"
  dl=$TOOLS/dl
  rm -rf "$dl" && mkdir -p "$dl"
  echo "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION --hash=sha256:$KUBERNETES_VALIDATE_SHA256" > "$dl/req.txt"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$dl/req.txt" -d "$dl"
  "$PYTHON" - "$dl" "$SCHEMAS" $K8S_SCHEMA_VERSIONS <<'EOF'
import glob, json, os, shutil, sys, zipfile
dl, dest, versions = sys.argv[1], sys.argv[2], sys.argv[3:]
(wheel,) = glob.glob(os.path.join(dl, "kubernetes_validate-*.whl"))
prefix = "kubernetes_validate/kubernetes-json-schema/"
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    for v in versions:
        sub = f"v{v}-local-strict/"
        members = [n for n in names if n.startswith(prefix + sub) and n.endswith(".json")]
        if not members:
            sys.exit(f"kubernetes-validate has no schemas for Kubernetes {v}")
        out = os.path.join(dest, sub)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for n in members:
            # The package resolves "$ref": "/api/_definitions.json#..." against "$id"s on
            # https://kubernetes.io/ through its own registry; kubeconform would try to fetch those
            # URLs. Drop the "$id"s and make the references relative to the file, so that they resolve
            # to the local _definitions.json.
            doc = json.loads(z.read(n))
            doc.pop("$id", None)
            text = json.dumps(doc).replace('"$ref": "/api/_definitions.json#', '"$ref": "_definitions.json#')
            with open(os.path.join(out, os.path.basename(n)), "w", encoding="utf-8") as dst:
                dst.write(text)
        print(f"  unpacked {len(members)} schemas to {out}")
EOF
  rm -rf "$dl"
  echo "$KUBERNETES_VALIDATE_VERSION $K8S_SCHEMA_VERSIONS $SCHEMA_LAYOUT" > "$STAMPS/k8s-schemas"
fi

say "done: helm $HELM_VERSION, helm-unittest $HELM_UNITTEST_VERSION, kubeconform $KUBECONFORM_VERSION," \
    "schemas from kubernetes-validate $KUBERNETES_VALIDATE_VERSION (Kubernetes $K8S_SCHEMA_VERSIONS) in ${TOOLS#"$ROOT"/}"
