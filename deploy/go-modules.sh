# Shell functions for the scripts that read Go modules' own sources
# (deploy/render-providers.sh, tests/k8s/build-binaries.sh,
# tests/k8s/clusterctl-repository.sh); sourced, not run.

# module_dir MODULE VERSION: the module's folder in the module cache (downloaded first
# if need be); exits with the reason when it cannot be had.
module_dir() {
  local dir
  dir="$(go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
  [ -d "$dir" ] || { echo "error: cannot download $1@$2" >&2; exit 1; }
  echo "$dir"
}
