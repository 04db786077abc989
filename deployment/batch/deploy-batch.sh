#!/usr/bin/env bash
# Run BLIP-2 over a folder of CSV files or images with an Azure ML batch endpoint.
#
# The steps follow the published Azure ML CLI (v2) flow for batch endpoints:
#   1. az ml compute create               (only with --create-compute)
#   2. az ml batch-endpoint create        (deployment/batch/batch-endpoint.yml)
#   3. az ml batch-deployment create      (deployment/batch/batch-deployment.yml, --set-default)
#   4. az ml batch-endpoint invoke        (--input: a local folder, uploaded, or a uri_folder)
#   5. az ml job stream, az ml job show   (wait for the job; fail unless it Completed)
#   6. az ml job download                 (output "score": named-outputs/score/predictions.csv)
#   7. az ml batch-endpoint delete        (only with --cleanup)
#
# predictions.csv has no header; read it with
#   pd.read_csv(path, header=None, names=["row_number_per_file", "text", "file_name"])
# Failed rows have the text "ERROR[<code>]: <message>"; row number -1 stands for a whole file.
#
# Needs the Azure CLI with the ml extension (az extension add -n ml) and a logged-in account
# (az login). Register the model first: deployment/register_model.py. With --dry-run the
# commands are printed, one per line prefixed with "+ ", and nothing is run.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: deployment/batch/deploy-batch.sh --input PATH_OR_URI [options]

  -i, --input PATH|URI       folder of CSV files or images: a local folder (uploaded), or a
                             uri_folder such as azureml://datastores/<store>/paths/<dir> or https://...
  -e, --endpoint NAME        batch endpoint   (env BLIP2_BATCH_ENDPOINT_NAME, default blip2-vqa-batch)
  -d, --deployment NAME      batch deployment (env BLIP2_BATCH_DEPLOYMENT_NAME, default blip2-batch)
  -w, --workspace NAME       workspace        (env BLIP2_WORKSPACE; else az's configured default)
  -g, --resource-group NAME  resource group   (env BLIP2_RESOURCE_GROUP; else az's configured default)
  -m, --model REF            e.g. azureml:blip2-opt-2.7b:2 (default: as in batch-deployment.yml)
  -c, --compute NAME         compute cluster  (default: as in batch-deployment.yml, gpu-cluster)
      --create-compute       create that cluster first (0 to --max-nodes nodes of --vm-size)
      --vm-size SKU          default Standard_NC24ads_A100_v4
      --max-nodes N          default 2
      --mini-batch-size N    files per run() call for this job (default: as in the YAML)
  -o, --download DIR         where to download the job output (default batch-output)
      --skip-create          do not create the endpoint and deployment (invoke only)
      --cleanup              delete the batch endpoint (and its deployments) at the end
      --dry-run              print the commands instead of running them
  -h, --help                 this text
USAGE
}

# shellcheck disable=SC1091  # the helpers: die, run, require_az
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

endpoint="${BLIP2_BATCH_ENDPOINT_NAME:-blip2-vqa-batch}"
deployment="${BLIP2_BATCH_DEPLOYMENT_NAME:-blip2-batch}"
workspace="${BLIP2_WORKSPACE:-}"
resource_group="${BLIP2_RESOURCE_GROUP:-}"
input=""
model=""
compute=""
create_compute=0
vm_size="Standard_NC24ads_A100_v4"
max_nodes=2
mini_batch_size=""
download="batch-output"
skip_create=0
cleanup=0
dry_run=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        -i | --input) input="${2:?--input needs a value}"; shift 2 ;;
        -e | --endpoint) endpoint="${2:?--endpoint needs a value}"; shift 2 ;;
        -d | --deployment) deployment="${2:?--deployment needs a value}"; shift 2 ;;
        -w | --workspace) workspace="${2:?--workspace needs a value}"; shift 2 ;;
        -g | --resource-group) resource_group="${2:?--resource-group needs a value}"; shift 2 ;;
        -m | --model) model="${2:?--model needs a value}"; shift 2 ;;
        -c | --compute) compute="${2:?--compute needs a value}"; shift 2 ;;
        --create-compute) create_compute=1; shift ;;
        --vm-size) vm_size="${2:?--vm-size needs a value}"; shift 2 ;;
        --max-nodes) max_nodes="${2:?--max-nodes needs a value}"; shift 2 ;;
        --mini-batch-size) mini_batch_size="${2:?--mini-batch-size needs a value}"; shift 2 ;;
        -o | --download) download="${2:?--download needs a value}"; shift 2 ;;
        --skip-create) skip_create=1; shift ;;
        --cleanup) cleanup=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

[[ -n "$input" ]] || { usage >&2; die "--input is required: a folder of CSV files or images"; }
# Azure's naming rule for endpoints and deployments: 3-32 characters, a letter first, then
# letters, digits and hyphens.
[[ "$endpoint" =~ ^[A-Za-z][A-Za-z0-9-]{2,31}$ ]] ||
    die "endpoint name '$endpoint' is invalid; use 3-32 letters, digits or hyphens, starting with a letter"
[[ "$deployment" =~ ^[A-Za-z][A-Za-z0-9-]{2,31}$ ]] ||
    die "deployment name '$deployment' is invalid; use 3-32 letters, digits or hyphens, starting with a letter"
[[ "$max_nodes" =~ ^[1-9][0-9]*$ ]] || die "--max-nodes must be a whole number >= 1, not '$max_nodes'"
[[ -z "$mini_batch_size" || "$mini_batch_size" =~ ^[1-9][0-9]*$ ]] ||
    die "--mini-batch-size must be a whole number >= 1, not '$mini_batch_size'"

# A local folder is uploaded by the CLI; check it here, before anything is created.
# (Resolved before the cd below, so relative paths mean what the caller meant.)
if [[ ! "$input" =~ ^(azureml:|https?://|wasbs?://|abfss?://|adl://) ]]; then
    [[ -d "$input" ]] || die "input folder '$input' not found (give a local folder or a uri_folder URI)"
    input="$(cd "$input" && pwd)"
fi
[[ "$download" = /* ]] || download="$PWD/$download"

# Work from the repository root so that the YAML paths below are the ones in the repo.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

scope=()
[[ -n "$resource_group" ]] && scope+=(--resource-group "$resource_group")
[[ -n "$workspace" ]] && scope+=(--workspace-name "$workspace")

overrides=()
[[ -n "$model" ]] && overrides+=(--set "model=$model")
[[ -n "$compute" ]] && overrides+=(--set "compute=azureml:$compute")

job_options=()
[[ -n "$mini_batch_size" ]] && job_options+=(--mini-batch-size "$mini_batch_size")

require_az

if ((create_compute)); then
    run az ml compute create --name "${compute:-gpu-cluster}" --type amlcompute --size "$vm_size" \
        --min-instances 0 --max-instances "$max_nodes" --idle-time-before-scale-down 600 "${scope[@]}"
fi

if ! ((skip_create)); then
    run az ml batch-endpoint create --file deployment/batch/batch-endpoint.yml --name "$endpoint" "${scope[@]}"
    # The first deployment builds the environment image (10-20 min).
    run az ml batch-deployment create --file deployment/batch/batch-deployment.yml \
        --endpoint-name "$endpoint" --name "$deployment" --set-default "${scope[@]}" "${overrides[@]}"
fi

invoke=(az ml batch-endpoint invoke --name "$endpoint" --deployment-name "$deployment"
    --input "$input" --input-type uri_folder "${job_options[@]}" --query name --output tsv "${scope[@]}")
if ((dry_run)); then
    run "${invoke[@]}"
    job="JOB_NAME"
else
    job="$(run "${invoke[@]}")"
    [[ -n "$job" ]] || die "az ml batch-endpoint invoke returned no job name"
    echo "Batch scoring job: $job" >&2
fi

# az ml job stream exits non-zero when the job fails: the status below says so, and --cleanup still runs
run az ml job stream --name "$job" "${scope[@]}" || echo "deploy-batch.sh: the job's log stream ended with an error" >&2
if ! ((dry_run)); then
    status="$(run az ml job show --name "$job" --query status --output tsv "${scope[@]}")"
    if [[ "$status" != "Completed" ]]; then
        echo "deploy-batch.sh: job $job ended with status '$status'; see 'az ml job show --name $job --web'" >&2
        if ((cleanup)); then
            run az ml batch-endpoint delete --name "$endpoint" --yes "${scope[@]}"
        fi
        exit 1
    fi
else
    run az ml job show --name "$job" --query status --output tsv "${scope[@]}"
fi

run az ml job download --name "$job" --output-name score --download-path "$download" "${scope[@]}"
predictions="$download/named-outputs/score/predictions.csv"
if ! ((dry_run)); then
    [[ -f "$predictions" ]] || die "the job finished but $predictions was not downloaded"
    echo "Predictions: $predictions ($(wc -l <"$predictions") rows)" >&2
fi

if ((cleanup)); then
    run az ml batch-endpoint delete --name "$endpoint" --yes "${scope[@]}"
fi
