#!/usr/bin/env bash
# Attach Azure Monitor autoscale rules to a BLIP-2 online deployment.
#
# Managed online deployments scale through Azure Monitor autoscale settings on the
# deployment's resource id. The rules below follow GPU utilisation, which is what
# saturates first: the batcher keeps one GPU busy with batches of up to
# BLIP2_MAX_BATCH_SIZE rows, so more concurrent requests only help once there are
# more instances.
#   scale out by 1 when GpuUtilizationPercentage averages > 70 % over 5 minutes
#   scale in  by 1 when GpuUtilizationPercentage averages < 20 % over 15 minutes
# A new instance needs the model load time (about 10 minutes) before it takes traffic,
# so the scale-out cool-down is long enough not to stack instances during that time.
# With --dry-run the commands are printed ("+ " first) and nothing runs.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deployment/autoscale.sh -g RESOURCE_GROUP [options]

  -e, --endpoint NAME        endpoint name   (env BLIP2_ENDPOINT_NAME, default blip2-vqa)
  -d, --deployment NAME      deployment name (env BLIP2_DEPLOYMENT_NAME, default blue)
  -w, --workspace NAME       workspace       (env BLIP2_WORKSPACE; else az's configured default)
  -g, --resource-group NAME  resource group  (env BLIP2_RESOURCE_GROUP; required)
      --min N                fewest instances (default 1)
      --max N                most instances (default 4)
      --count N              instances when no metric is available (default 1)
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
min_count=1
max_count=4
count=1
dry_run=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        -e | --endpoint) endpoint="${2:?--endpoint needs a value}"; shift 2 ;;
        -d | --deployment) deployment="${2:?--deployment needs a value}"; shift 2 ;;
        -w | --workspace) workspace="${2:?--workspace needs a value}"; shift 2 ;;
        -g | --resource-group) resource_group="${2:?--resource-group needs a value}"; shift 2 ;;
        --min) min_count="${2:?--min needs a value}"; shift 2 ;;
        --max) max_count="${2:?--max needs a value}"; shift 2 ;;
        --count) count="${2:?--count needs a value}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

[[ -n "$resource_group" ]] || die "the autoscale setting needs a resource group; pass -g NAME or set BLIP2_RESOURCE_GROUP"
for n in "$min_count" "$max_count" "$count"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "instance counts must be whole numbers, got '$n'"
done
if ((min_count < 1 || min_count > count || count > max_count)); then
    die "need 1 <= --min ($min_count) <= --count ($count) <= --max ($max_count)"
fi

scope=(--resource-group "$resource_group")
[[ -n "$workspace" ]] && scope+=(--workspace-name "$workspace")
autoscale_name="autoscale-$endpoint-$deployment"

if ((dry_run)); then
    run az ml online-deployment show --endpoint-name "$endpoint" --name "$deployment" \
        --query id --output tsv "${scope[@]}"
    deployment_id="<deployment-resource-id>"
else
    require_az
    deployment_id="$(az ml online-deployment show --endpoint-name "$endpoint" --name "$deployment" \
        --query id --output tsv "${scope[@]}")"
fi

run az monitor autoscale create --name "$autoscale_name" --resource "$deployment_id" \
    --resource-group "$resource_group" --min-count "$min_count" --max-count "$max_count" --count "$count"
run az monitor autoscale rule create --autoscale-name "$autoscale_name" --resource-group "$resource_group" \
    --condition "GpuUtilizationPercentage > 70 avg 5m" --scale out 1 --cooldown 15
run az monitor autoscale rule create --autoscale-name "$autoscale_name" --resource-group "$resource_group" \
    --condition "GpuUtilizationPercentage < 20 avg 15m" --scale in 1 --cooldown 15
