#!/usr/bin/env bash
# Deploy the BLIP-2 scoring service to an Azure ML managed online endpoint.
#
# The steps follow the published Azure ML CLI (v2) flow:
#   1. az ml online-endpoint create       (deployment/endpoint.yml)
#   2. az ml online-deployment create     (deployment/deployment.yml, --all-traffic)
#   3. az ml online-endpoint invoke       (deployment/sample-request.json)
#   4. az ml online-deployment get-logs
#   5. az ml online-endpoint delete       (only with --cleanup)
#
# Needs the Azure CLI with the ml extension (az extension add -n ml) and a logged-in
# account (az login). Register the model first: deployment/register_model.py.
# With --dry-run the commands are printed, one per line prefixed with "+ ", and
# nothing is run (az need not be installed).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deployment/deploy.sh [options]

  -e, --endpoint NAME        endpoint name   (env BLIP2_ENDPOINT_NAME, default blip2-vqa)
  -d, --deployment NAME      deployment name (env BLIP2_DEPLOYMENT_NAME, default blue)
  -w, --workspace NAME       workspace       (env BLIP2_WORKSPACE; else az's configured default)
  -g, --resource-group NAME  resource group  (env BLIP2_RESOURCE_GROUP; else az's configured default)
  -m, --model REF            model to serve, e.g. azureml:blip2-opt-2.7b:2 (default: as in deployment.yml)
  -i, --instance-type SKU    e.g. Standard_NC4as_T4_v3 (default: as in deployment.yml)
  -r, --request-file FILE    request to invoke with (default deployment/sample-request.json)
      --skip-create          do not create the endpoint and deployment (invoke and logs only)
      --cleanup              delete the endpoint (and its deployments) at the end
      --dry-run              print the commands instead of running them
  -h, --help                 this text
EOF
}

# shellcheck disable=SC1091  # the helpers: die, run, require_az
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

endpoint="${BLIP2_ENDPOINT_NAME:-blip2-vqa}"
deployment="${BLIP2_DEPLOYMENT_NAME:-blue}"
workspace="${BLIP2_WORKSPACE:-}"
resource_group="${BLIP2_RESOURCE_GROUP:-}"
model=""
instance_type=""
request_file="deployment/sample-request.json"
skip_create=0
cleanup=0
dry_run=0

# shellcheck disable=SC2034  # dry_run is read by run and require_az (lib.sh)
while [[ $# -gt 0 ]]; do
    case "$1" in
        -e | --endpoint) endpoint="${2:?--endpoint needs a value}"; shift 2 ;;
        -d | --deployment) deployment="${2:?--deployment needs a value}"; shift 2 ;;
        -w | --workspace) workspace="${2:?--workspace needs a value}"; shift 2 ;;
        -g | --resource-group) resource_group="${2:?--resource-group needs a value}"; shift 2 ;;
        -m | --model) model="${2:?--model needs a value}"; shift 2 ;;
        -i | --instance-type) instance_type="${2:?--instance-type needs a value}"; shift 2 ;;
        -r | --request-file) request_file="${2:?--request-file needs a value}"; shift 2 ;;
        --skip-create) skip_create=1; shift ;;
        --cleanup) cleanup=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

# Azure's naming rule for endpoints: 3-32 characters, a letter first, then letters,
# digits and hyphens.
if [[ ! "$endpoint" =~ ^[A-Za-z][A-Za-z0-9-]{2,31}$ ]]; then
    die "endpoint name '$endpoint' is invalid; use 3-32 letters, digits or hyphens, starting with a letter"
fi
if [[ ! "$deployment" =~ ^[A-Za-z][A-Za-z0-9-]{2,31}$ ]]; then
    die "deployment name '$deployment' is invalid; use 3-32 letters, digits or hyphens, starting with a letter"
fi

# Work from the repository root so that the YAML paths below are the ones in the repo.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -f "$request_file" ]] || die "request file '$request_file' not found"

scope=()
[[ -n "$resource_group" ]] && scope+=(--resource-group "$resource_group")
[[ -n "$workspace" ]] && scope+=(--workspace-name "$workspace")

overrides=()
[[ -n "$model" ]] && overrides+=(--set "model=$model")
[[ -n "$instance_type" ]] && overrides+=(--set "instance_type=$instance_type")

require_az

if ! ((skip_create)); then
    run az ml online-endpoint create --file deployment/endpoint.yml --name "$endpoint" "${scope[@]}"
    # Building the environment and loading 15 GB of weights take a while (20-40 min).
    run az ml online-deployment create --file deployment/deployment.yml \
        --endpoint-name "$endpoint" --name "$deployment" --all-traffic "${scope[@]}" "${overrides[@]}"
fi

run az ml online-endpoint show --name "$endpoint" --query scoring_uri --output tsv "${scope[@]}"
run az ml online-endpoint invoke --name "$endpoint" --deployment-name "$deployment" \
    --request-file "$request_file" "${scope[@]}"
run az ml online-deployment get-logs --endpoint-name "$endpoint" --name "$deployment" --lines 100 "${scope[@]}"

if ((cleanup)); then
    run az ml online-endpoint delete --name "$endpoint" --yes "${scope[@]}"
fi
