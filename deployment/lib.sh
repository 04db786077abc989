# shellcheck shell=bash
# Helpers shared by deploy.sh, autoscale.sh and batch/deploy-batch.sh. Sourced, not run.
# The caller sets dry_run=1 to print commands instead of running them.

# Print "<script>: message" on stderr and exit 2 (a usage or set-up error).
die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

# Run a command, echoing it first; with dry_run=1 only print it, shell-quoted.
run() {
    if ((${dry_run:-0})); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        echo "+ $*" >&2
        "$@"
    fi
}

# Stop unless the Azure CLI is installed (not needed for a dry run).
require_az() {
    if ! ((${dry_run:-0})) && ! command -v az >/dev/null 2>&1; then
        die "the Azure CLI (az) is not on PATH; install it and run 'az extension add -n ml'"
    fi
}
