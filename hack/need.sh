#!/usr/bin/env bash
# hack/need.sh TARGET: run first by each make target that needs programs
# beyond Go. It names every missing program with the Debian package that
# has it, and fails at once when the target cannot run without them (make
# e2e used to fail ten minutes in on a missing mkfs.btrfs). For make test,
# whose cases skip what they cannot do, it says which cases will be skipped;
# make test then ends with the list of what it skipped (hack/test.sh).
set -euo pipefail
target=${1:?usage: hack/need.sh test|sanity|run|bench|e2e}

# program -> Debian package
declare -A package=(
  [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [resize2fs]=e2fsprogs [tune2fs]=e2fsprogs [dumpe2fs]=e2fsprogs
  [mkfs.xfs]=xfsprogs [xfs_growfs]=xfsprogs [xfs_admin]=xfsprogs
  [mkfs.btrfs]=btrfs-progs [btrfs]=btrfs-progs
  [blkid]=util-linux [unshare]=util-linux [nsenter]=util-linux
  [losetup]=mount [mount]=mount [umount]=mount
  [dd]=coreutils [fio]=fio [openssl]=openssl
)
# what the driver runs for each filesystem
ext4=(mkfs.ext4 e2fsck resize2fs tune2fs dumpe2fs blkid)
xfs=(mkfs.xfs xfs_growfs xfs_admin)
btrfs=(mkfs.btrfs btrfs)

required=() optional=() why=''
case $target in
  test)
    # Unit tests need nothing; the root tiers (loop devices, mounts) skip
    # the filesystems whose tools are missing.
    if [ "$EUID" = 0 ]; then optional=("${ext4[@]}" "${xfs[@]}" "${btrfs[@]}" losetup mount umount unshare nsenter); fi
    why='their cases are skipped' ;;
  sanity|run) required=("${ext4[@]}" mount umount) ;;
  bench) required=("${ext4[@]}" "${xfs[@]}" losetup mount umount dd); optional=(fio); why='the bench uses its own O_DIRECT I/O instead' ;;
  # openssl: the deploy tier makes the snapshot-metadata sidecar's
  # certificate by deploy/README.md's procedure.
  e2e) required=("${ext4[@]}" "${xfs[@]}" "${btrfs[@]}" losetup mount umount openssl) ;;
  *) echo "need.sh: unknown target $target" >&2; exit 2 ;;
esac

missing() {
  local out=() p
  for p in "$@"; do command -v "$p" >/dev/null || out+=("$p (${package[$p]:-?})"); done
  [ ${#out[@]} -eq 0 ] || { local IFS=,; echo "${out[*]}"; }
}
if [ ${#required[@]} -gt 0 ]; then
  m=$(missing "${required[@]}")
  if [ -n "$m" ]; then
    declare -A want=()
    for p in "${required[@]}"; do command -v "$p" >/dev/null || want[${package[$p]}]=1; done
    pkgs=''
    for p in btrfs-progs coreutils e2fsprogs fio mount openssl util-linux xfsprogs; do [ -z "${want[$p]:-}" ] || pkgs+=" $p"; done
    echo "make $target: missing ${m//,/, }; install them first: apt-get install${pkgs}" >&2
    exit 1
  fi
fi
if [ ${#optional[@]} -gt 0 ]; then
  m=$(missing "${optional[@]}")
  if [ -n "$m" ]; then
    echo "make $target: missing ${m//,/, }: $why (apt-get install the packages named)" >&2
  fi
fi
exit 0
