#!/usr/bin/env bash
# Validates the Helm chart helm/avatarforcing OFFLINE, with the tools scripts/install_helm_tools.sh puts
# in .tools/ (run that first; tests/test_helm.py runs both):
#
#   for each values file helm/avatarforcing/ci/*.yaml
#     helm lint --strict            (values.schema.json included)
#     helm template                 (extra args from a "# helm-check-args: ..." line in the file,
#                                    e.g. --api-versions monitoring.coreos.com/v1/ServiceMonitor;
#                                    helm 3's lint has no --api-versions, so they apply to template only)
#     kubeconform (strict schemas)  every rendered manifest, against each Kubernetes version in
#                                   K8S_VERSIONS; unknown fields and wrong types are errors. The
#                                   ServiceMonitor CRD has no schema there: it is skipped explicitly
#                                   (-skip ServiceMonitor) and only checked to be rendered.
#   helm unittest helm/avatarforcing (helm/avatarforcing/tests/*_test.yaml)
#
# Exits non-zero on the first failure. Environment: HELM_TOOLS_DIR (default <repo>/.tools),
# K8S_VERSIONS (default "1.30.0 1.37.0": the schema sets the install script unpacks).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${HELM_TOOLS_DIR:-$ROOT/.tools}
CHART=$ROOT/helm/avatarforcing
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
# Capabilities.KubeVersion for lint and template: the oldest version validated against.
KUBE_VERSION=${K8S_VERSIONS%% *}

HELM=$TOOLS/bin/helm
KUBECONFORM=$TOOLS/bin/kubeconform
# Keep helm's state project-local: nothing is read from or written to ~/.config, ~/.cache, ~/.local.
export HELM_PLUGINS=$TOOLS/helm-plugins
export HELM_CACHE_HOME=$TOOLS/helm/cache HELM_CONFIG_HOME=$TOOLS/helm/config HELM_DATA_HOME=$TOOLS/helm/data

missing=()
[[ -x "$HELM" ]] || missing+=("$HELM")
[[ -x "$KUBECONFORM" ]] || missing+=("$KUBECONFORM")
[[ -x "$HELM_PLUGINS/unittest/untt" ]] || missing+=("$HELM_PLUGINS/unittest/untt")
for v in $K8S_VERSIONS; do
  [[ -f "$TOOLS/k8s-schemas/v$v-local-strict/deployment-apps-v1.json" ]] || missing+=("schemas for Kubernetes $v")
done
if ((${#missing[@]})); then
  printf 'helm_check: missing %s\n' "${missing[@]}" >&2
  echo "helm_check: run scripts/install_helm_tools.sh first" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

shopt -s nullglob
values_files=("$CHART"/ci/*.yaml)
((${#values_files[@]})) || { echo "helm_check: no values files in $CHART/ci" >&2; exit 1; }

echo "helm_check: chart ${CHART#"$ROOT"/}, $(basename "$HELM") $("$HELM" version --short)," \
     "kubeconform $("$KUBECONFORM" -v), Kubernetes schemas $K8S_VERSIONS"
resources_total=0
for values in "${values_files[@]}"; do
  name=$(basename "$values")
  extra=()
  args_line=$(sed -n 's/^#[[:space:]]*helm-check-args:[[:space:]]*//p' "$values" | head -n1)
  [[ -z "$args_line" ]] || read -r -a extra <<< "$args_line"
  echo "== $name${extra[*]:+ (${extra[*]})}"

  "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" -f "$values" > "$work/lint.log" 2>&1 || {
    cat "$work/lint.log"; echo "helm_check: FAILED: helm lint --strict with $name" >&2; exit 1; }
  echo "   lint --strict: ok"

  rendered=$work/${name%.yaml}.rendered.yaml
  "$HELM" template avatarforcing "$CHART" --namespace avatarforcing --kube-version "$KUBE_VERSION" \
    -f "$values" "${extra[@]}" > "$rendered" 2> "$work/template.log" || {
    cat "$work/template.log"; echo "helm_check: FAILED: helm template with $name" >&2; exit 1; }
  kinds=$(sed -n 's/^kind: //p' "$rendered" | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')
  echo "   template: $kinds"
  if [[ " ${extra[*]} " == *" monitoring.coreos.com/v1/ServiceMonitor "* ]] && ! grep -q '^kind: ServiceMonitor$' "$rendered"; then
    echo "helm_check: FAILED: $name enables the ServiceMonitor and the CRD is available, but none was rendered" >&2
    exit 1
  fi

  for v in $K8S_VERSIONS; do
    if ! "$KUBECONFORM" -strict -summary -skip ServiceMonitor \
         -schema-location "$TOOLS/k8s-schemas/v$v-local-strict/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
         "$rendered" > "$work/kubeconform.log" 2>&1; then
      cat "$work/kubeconform.log"
      echo "helm_check: FAILED: Kubernetes $v schema validation of the manifests rendered with $name" >&2
      exit 1
    fi
    echo "   kubeconform $v (strict, ServiceMonitor skipped): $(sed -n 's/^Summary: //p' "$work/kubeconform.log")"
  done
  resources_total=$((resources_total + $(grep -c '^kind: ' "$rendered")))
done

echo "== helm unittest"
"$HELM" unittest --strict --color=false "$CHART" > "$work/unittest.log" 2>&1 || {
  cat "$work/unittest.log"; echo "helm_check: FAILED: helm unittest" >&2; exit 1; }
grep -E '^(Charts|Test Suites|Tests|Snapshot|Time):' "$work/unittest.log" | sed 's/^/   /'

echo "helm_check: OK: ${#values_files[@]} values files ($(cd "$CHART/ci" && echo *.yaml)), $resources_total manifests" \
     "linted, rendered and schema-validated; unit tests passed"
