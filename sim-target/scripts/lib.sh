# Shared helpers for the sim-target LIO scripts (stg-up, stg-down,
# stg-status). Sourced, not executed.
# shellcheck shell=bash
#
# Names (everything derives from the STG id, so two STGs could coexist):
#   user backstore   core/user_<ID>/stp_s<ID>_l<L>_h<H>   (LUN L, host path H)
#                    dev_config = stp/lun=<L>,initiator=h<H>
#   ramdisk          core/rd_mcp_*/stp_rd                  (shared, made by targetcli)
#   fileio           core/fileio_*/stp_fd                  (shared, raw configfs; a sparse
#                    file <state-dir>/fileio/stp_fd.img, thin provisioned)
#   host path H      tcm_loop target naa.5001405<ID-1 as 6 hex digits>a<H as 2 hex digits>
#                    (STG 1: naa.5001405000000a00, naa.5001405000000a01, ...)
#   initiator name   h<H>
#   iSCSI target     iqn.2026-12.org.example.stp:stg<ID> (--iscsi-target), TPG 1;
#                    initiator IQN k is host H (a host of its own after the
#                    tcm_loop paths, or IQN=H: host H's backstores)

# shellcheck disable=SC2034 # the constants are for the scripts that source this
STP_PROG="${STP_PROG:-${0##*/}}"
STP_CONFIGFS="${STP_CONFIGFS:-/sys/kernel/config}"
STP_TARGET_CFS="$STP_CONFIGFS/target"
STP_STATE_DIR_DEFAULT="/run/stp-target"
STP_MAP_DEFAULT="${STP_LIO_MAP:-/run/stp/sim-target.json}"
STP_RD_NAME="stp_rd"
# A fixed unit serial for the ramdisk, so its NAA (LIO derives it from the
# serial's hex digits) stays the same across set-ups.
STP_RD_SERIAL="5354502d-7264-4000-8000-000000000001"
STP_FD_NAME="stp_fd"
# The fileio backstore's unit serial ("STP-fd"), for a stable NAA likewise.
STP_FD_SERIAL="5354502d-6664-4000-8000-000000000001"
# Its HBA when stg-up makes it (fileio_<n>: n is any number; this one is
# far from the indexes targetcli picks).
STP_FD_HBA="fileio_4201"
STP_QUIET=0
# Is /dev a devtmpfs (device nodes made by the kernel)?
STP_DEVTMPFS=0
while read -r _ _stp_mnt _stp_type _; do
    [[ "$_stp_mnt" == /dev && "$_stp_type" == devtmpfs ]] && STP_DEVTMPFS=1
done </proc/mounts
unset _stp_mnt _stp_type

say() { ((STP_QUIET)) || printf '%s: %s\n' "$STP_PROG" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$STP_PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$STP_PROG" "$*" >&2
    exit 1
}

# Every external command costs ~50 ms in the test VM (exec over 9p, under
# TCG): these helpers stay inside bash where they can.

# The first line of a file (sysfs/configfs attributes), or failure.
stp_readf() {
    local v=""
    { read -r v || [[ -n "$v" ]]; } <"$1" 2>/dev/null || return 1
    printf '%s' "$v"
}

# "hba/name" of a backstore directory.
stp_bs_key() { printf '%s' "${1#"$STP_TARGET_CFS"/core/}"; }

# Microseconds since the epoch (the separator in EPOCHREALTIME follows the locale).
stp_now_us() { printf '%s' "${EPOCHREALTIME//[^0-9]/}"; }

# ---- names --------------------------------------------------------------

stp_bs_name() { printf 'stp_s%s_l%s_h%s' "$1" "$2" "$3"; }          # ID L H
stp_hba_dir() { printf '%s/core/user_%s' "$STP_TARGET_CFS" "$1"; }     # ID
stp_dev_config() { printf 'stp/lun=%s,initiator=h%s' "$1" "$2"; }    # L H
stp_wwn_prefix() { printf 'naa.5001405%06xa' "$(($1 - 1))"; }         # ID
stp_wwn() { printf '%s%02x' "$(stp_wwn_prefix "$1")" "$2"; }          # ID H
stp_tpg_dir() { printf '%s/loopback/%s/tpgt_1' "$STP_TARGET_CFS" "$1"; } # WWN
# The NAA LIO gives a backstore with unit serial $1: naa.6001405 and the
# serial's first 25 hex digits.
stp_lio_naa() { local h="${1//-/}"; printf 'naa.6001405%s' "${h:0:25}"; }
stp_iscsi_iqn() { printf 'iqn.2026-12.org.example.stp:stg%s' "$1"; }    # ID

# ---- argument checks ----------------------------------------------------

# Bytes from a size: digits with an optional binary suffix (K, M, G, T,
# optionally followed by iB or B), or a plain number of bytes ("512", "512B").
stp_parse_size() {
    local s="$1" n unit
    if [[ "$s" =~ ^([0-9]+)([KkMmGgTt]?)(i?[Bb])?$ ]]; then
        n="${BASH_REMATCH[1]}"
        unit="${BASH_REMATCH[2]}"
    else
        return 1
    fi
    n=$((10#$n))
    case "$unit" in
    "") ;;
    [Kk]) n=$((n << 10)) ;;
    [Mm]) n=$((n << 20)) ;;
    [Gg]) n=$((n << 30)) ;;
    [Tt]) n=$((n << 40)) ;;
    esac
    printf '%s' "$n"
}

# Dies unless $2 is an integer in [$3, $4]; $1 names the option.
stp_check_int() {
    local what="$1" v="$2" lo="$3" hi="$4"
    [[ "$v" =~ ^[0-9]+$ ]] || die "$what must be a number, not '$v'"
    v=$((10#$v))
    ((v >= lo && v <= hi)) || die "$what must be between $lo and $hi, not $v"
}

# Human-readable bytes (binary units, exact when it divides).
stp_human() {
    local b="$1"
    if ((b >= 1 << 30 && b % (1 << 30) == 0)); then
        printf '%sG' $((b >> 30))
    elif ((b >= 1 << 20 && b % (1 << 20) == 0)); then
        printf '%sM' $((b >> 20))
    elif ((b >= 1 << 10 && b % (1 << 10) == 0)); then
        printf '%sK' $((b >> 10))
    else
        printf '%sB' "$b"
    fi
}

# ---- preconditions ------------------------------------------------------

stp_need_root() {
    ((EUID == 0)) || die "must run as root (configfs and /dev/sg* need it)"
}

stp_configfs_mounted() {
    local _dev mnt type _rest
    while read -r _dev mnt type _rest; do
        [[ "$mnt" == "$STP_CONFIGFS" && "$type" == configfs ]] && return 0
    done </proc/mounts
    return 1
}

stp_need_configfs() {
    stp_configfs_mounted ||
        die "configfs is not mounted on $STP_CONFIGFS; mount it with: mount -t configfs configfs $STP_CONFIGFS"
}

# Loads a kernel module if it is not there yet; dies with $2 as the hint.
stp_need_module() {
    local m="$1" hint="${2:-}"
    [[ -d "/sys/module/$m" ]] && return 0
    if ! modprobe "$m" 2>/dev/null; then
        die "kernel module $m is missing and 'modprobe $m' failed${hint:+; $hint}"
    fi
    [[ -d "/sys/module/$m" ]] || die "modprobe $m succeeded but /sys/module/$m did not appear"
}

stp_need_tool() {
    local tool="$1" pkg="$2"
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (Debian package: $pkg)"
}

# Serialises stg-up/stg-down (fd 8). Children that outlive the script
# (the daemon) must be started with 8>&-.
stp_lock() {
    local dir=/run/lock
    [[ -d "$dir" ]] || dir=/run
    command -v flock >/dev/null 2>&1 || return 0
    exec 8>"$dir/stp-sim-target.lock" || die "cannot open the lock file $dir/stp-sim-target.lock"
    if ! flock -n 8; then
        say "waiting for another stg-up/stg-down to finish"
        flock 8
    fi
}

# ---- targetcli ----------------------------------------------------------

# Runs one targetcli command; its output is shown only when it fails (or
# with STP_VERBOSE=1). rtslib's dbroot warning is silenced.
stp_targetcli() {
    local out rc=0
    out="$(PYTHONWARNINGS=ignore targetcli "$@" 2>&1)" || rc=$?
    if ((rc != 0)) || [[ "${STP_VERBOSE:-0}" == 1 ]]; then
        printf '%s\n' "$out" | sed 's/\x1b\[[0-9;]*m//g; s/^/    targetcli: /' >&2
    fi
    ((rc == 0)) || die "'targetcli $*' failed (exit $rc)"
}

# ---- configfs inspection ------------------------------------------------

# "plugin_hba/name" of the backstore a LUN directory links to (empty if none).
stp_lun_backstore() {
    local lundir="$1" l t n
    for l in "$lundir"/*; do
        [[ -L "$l" ]] || continue
        t="$(readlink "$l")"
        t="${t%/}"
        n="${t##*/}"
        t="${t%/*}"
        printf '%s/%s' "${t##*/}" "$n"
        return 0
    done
}

# Does the LUN directory $1 link to backstore "hba/name" $2? (No exec:
# compares the link's target with the backstore by device and inode.)
stp_lun_links_to() {
    local l
    for l in "$1"/*; do
        [[ -L "$l" && "$l" -ef "$STP_TARGET_CFS/core/$2" ]] && return 0
    done
    return 1
}

# Every LUN directory of every fabric's TPGs (one per line).
stp_all_lun_dirs() {
    local d
    for d in "$STP_TARGET_CFS"/*/*/tpgt_*/lun/lun_*; do
        [[ -d "$d" ]] && printf '%s\n' "$d"
    done
    return 0
}

# Removes a LUN: the node ACLs' mapped LUNs that point at it (iSCSI), its
# backstore link, the directory.
stp_remove_lun() {
    local lundir="$1" l m tpg
    tpg="${lundir%/lun/*}"
    for m in "$tpg"/acls/*/lun_*; do
        [[ -d "$m" ]] || continue
        for l in "$m"/*; do
            [[ -L "$l" && "$l" -ef "$lundir" ]] || continue
            rm -f "$l" || die "cannot unlink mapped LUN $l"
            rmdir "$m" 2>/dev/null || die "cannot remove mapped LUN $m"
            break
        done
    done
    for l in "$lundir"/*; do
        [[ -L "$l" ]] && { rm -f "$l" || die "cannot unlink $l"; }
    done
    rmdir "$lundir" 2>/dev/null || die "cannot remove $lundir (mapped LUNs or ALUA settings still refer to it?)"
}

# Removes every LUN, in any target, that links to backstore "hba/name".
stp_unlink_backstore_everywhere() {
    local want="$1" d
    while IFS= read -r d; do
        stp_lun_links_to "$d" "$want" || continue
        say "unlinking LUN ${d#"$STP_TARGET_CFS"/}"
        stp_remove_lun "$d"
    done < <(stp_all_lun_dirs)
}

# Is backstore "hba/name" linked into any LUN?
stp_backstore_linked() {
    local want="$1" d
    while IFS= read -r d; do
        stp_lun_links_to "$d" "$want" && return 0
    done < <(stp_all_lun_dirs)
    return 1
}

# Path of the ramdisk backstore, if it exists.
stp_rd_path() {
    local d
    for d in "$STP_TARGET_CFS"/core/rd_mcp_*/"$STP_RD_NAME"; do
        [[ -d "$d" ]] && { printf '%s' "$d"; return 0; }
    done
    return 1
}

# Path of the fileio backstore, if it exists.
stp_fd_path() {
    local d
    for d in "$STP_TARGET_CFS"/core/fileio_*/"$STP_FD_NAME"; do
        [[ -d "$d" ]] && { printf '%s' "$d"; return 0; }
    done
    return 1
}

# "FILE SIZE" of a fileio backstore, from its info
# ("TCM FILEIO ID: n  File: PATH  Size: N  Mode: ...").
stp_fd_file_size() {
    local info
    [[ -r "$1/info" ]] || return 1
    info="$(<"$1/info")"
    [[ "$info" =~ File:\ *([^[:space:]]+)\ +Size:\ *([0-9]+) ]] || return 1
    printf '%s %s' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
}

# Size in bytes of a ramdisk backstore, from its info ("PAGES/PAGE_SIZE: N*S").
stp_rd_bytes() {
    local info
    [[ -r "$1/info" ]] || return 1
    info="$(<"$1/info")"
    [[ "$info" =~ PAGES/PAGE_SIZE:\ *([0-9]+)\*([0-9]+) ]] || return 1
    printf '%s' $((BASH_REMATCH[1] * BASH_REMATCH[2]))
}

# The user backstores of STG $1 (paths, one per line).
stp_user_backstores() {
    local d
    for d in "$STP_TARGET_CFS"/core/user_*/stp_s"$1"_l*_h*; do
        [[ -d "$d" ]] && printf '%s\n' "$d"
    done
    return 0
}

# The tcm_loop targets of STG $1 (WWNs, one per line).
stp_loop_targets() {
    local d prefix
    prefix="$(stp_wwn_prefix "$1")"
    for d in "$STP_TARGET_CFS"/loopback/"$prefix"*; do
        [[ -d "$d" ]] && printf '%s\n' "${d##*/}"
    done
    return 0
}

# Deletes a tcm_loop target with raw configfs: LUNs, nexus, TPG, WWN.
stp_delete_loop_target() {
    local wwn="$1" base tpg d
    base="$STP_TARGET_CFS/loopback/$wwn"
    [[ -d "$base" ]] || return 0
    for tpg in "$base"/tpgt_*; do
        [[ -d "$tpg" ]] || continue
        for d in "$tpg"/lun/lun_*; do
            [[ -d "$d" ]] && stp_remove_lun "$d"
        done
        if [[ -n "$(stp_readf "$tpg/nexus")" ]]; then
            printf 'NULL' >"$tpg/nexus" 2>/dev/null || die "cannot drop the nexus of $wwn"
        fi
        rmdir "$tpg" || die "cannot remove $tpg"
    done
    rmdir "$base" || die "cannot remove $base"
}

# The iSCSI targets of STG $1 (IQNs, one per line): the default name, and
# any other whose LUNs link to the STG's user backstores.
stp_iscsi_targets() {
    local d l def
    def="$(stp_iscsi_iqn "$1")"
    for d in "$STP_TARGET_CFS"/iscsi/iqn.*; do
        [[ -d "$d" ]] || continue
        if [[ "${d##*/}" == "$def" ]]; then
            printf '%s\n' "${d##*/}"
            continue
        fi
        for l in "$d"/tpgt_*/lun/lun_*/*; do
            if [[ -L "$l" && "$(readlink -f "$l")" == "$(stp_hba_dir "$1")"/* ]]; then
                printf '%s\n' "${d##*/}"
                break
            fi
        done
    done
    return 0
}

# Deletes an iSCSI target with raw configfs: each TPG disabled (its sessions
# dropped), its node ACLs with their mapped LUNs, its LUNs, its portals,
# then the TPG and the target. (One rm and one rmdir per kind of object:
# each command costs ~50 ms in the test VM.)
stp_delete_iscsi_target() {
    local base="$STP_TARGET_CFS/iscsi/$1" tpg d m l
    [[ -d "$base" ]] || return 0
    for tpg in "$base"/tpgt_*; do
        [[ -d "$tpg" ]] || continue
        if [[ "$(stp_readf "$tpg/enable")" == 1 ]]; then
            printf '0' >"$tpg/enable" 2>/dev/null || die "cannot disable $tpg"
        fi
        local -a links=() mapped=() acls=() lundirs=() nps=()
        for d in "$tpg"/acls/*; do
            [[ -d "$d" ]] || continue
            acls+=("$d")
            for m in "$d"/lun_*; do
                [[ -d "$m" ]] || continue
                mapped+=("$m")
                for l in "$m"/*; do
                    [[ -L "$l" ]] && links+=("$l")
                done
            done
        done
        for d in "$tpg"/lun/lun_*; do
            [[ -d "$d" ]] || continue
            lundirs+=("$d")
            for l in "$d"/*; do
                [[ -L "$l" ]] && links+=("$l")
            done
        done
        for d in "$tpg"/np/*; do
            [[ -d "$d" ]] && nps+=("$d")
        done
        ((${#links[@]} == 0)) || rm -f "${links[@]}" || die "cannot unlink the LUNs of $tpg"
        ((${#mapped[@]} == 0)) || rmdir "${mapped[@]}" || die "cannot remove the mapped LUNs of $tpg"
        ((${#acls[@]} == 0)) || rmdir "${acls[@]}" || die "cannot remove the node ACLs of $tpg"
        ((${#lundirs[@]} == 0)) || rmdir "${lundirs[@]}" || die "cannot remove the LUNs of $tpg"
        ((${#nps[@]} == 0)) || rmdir "${nps[@]}" || die "cannot remove the network portals of $tpg"
        rmdir "$tpg" || die "cannot remove $tpg"
    done
    rmdir "$base" || die "cannot remove $base"
}

# ---- the daemon ---------------------------------------------------------

# Prints the pid of the daemon serving state dir $1, if it is alive.
stp_daemon_pid() {
    local pid=""
    [[ -r "$1/pid" ]] || return 1
    read -r pid <"$1/pid" 2>/dev/null || true
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    printf '%s' "$pid"
}

# The daemon's command line, space-separated.
stp_daemon_cmdline() {
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | sed 's/ $//'
}

# ---- SCSI devices -------------------------------------------------------

# "H:C:T" of a tcm_loop target's SCSI host (empty until the nexus exists).
stp_loop_address() {
    stp_readf "$(stp_tpg_dir "$1")/address" || true
}

# Makes sure /dev/NAME is a node of type $2 (c or b) with the numbers in
# sysfs file $3; creates or fixes it when udev/devtmpfs did not.
stp_ensure_node() {
    local name="$1" type="$2" devfile="$3" mm maj min node cur
    mm="$(stp_readf "$devfile")" || return 1
    maj="${mm%%:*}"
    min="${mm##*:}"
    node="/dev/$name"
    if [[ -e "$node" ]]; then
        # devtmpfs keeps its nodes right: no need to look closer.
        if ((STP_DEVTMPFS)) && { [[ "$type" == c && -c "$node" ]] || [[ "$type" == b && -b "$node" ]]; }; then
            return 0
        fi
        cur="$(stat -L -c '%t:%T' "$node" 2>/dev/null || true)"
        if [[ "$cur" == "$(printf '%x:%x' "$maj" "$min")" ]] &&
            { [[ "$type" == c && -c "$node" ]] || [[ "$type" == b && -b "$node" ]]; }; then
            return 0
        fi
        say "replacing stale device node $node"
        rm -f "$node"
    fi
    mknod -m 0660 "$node" "$type" "$maj" "$min" || die "mknod $node $type $maj $min failed"
    chgrp disk "$node" 2>/dev/null || true
}

# The sg name (sgN) and block name (sdX) of SCSI device H:C:T:L, if any.
stp_sg_of() {
    local d
    for d in "/sys/bus/scsi/devices/$1/scsi_generic"/sg*; do
        [[ -e "$d" ]] && { printf '%s' "${d##*/}"; return 0; }
    done
    return 1
}
stp_block_of() {
    local d
    for d in "/sys/bus/scsi/devices/$1/block"/*; do
        [[ -e "$d" ]] && { printf '%s' "${d##*/}"; return 0; }
    done
    return 1
}

# The logical unit's NAA designator from VPD page 0x83, as naa.<hex>.
stp_naa_of() {
    local dev="$1" hex i len n desc_len b0 b1 type assoc out
    hex="$(sg_inq --page=0x83 --raw "$dev" 2>/dev/null | od -An -v -tx1)" || return 1
    # shellcheck disable=SC2206 # word splitting into bytes is the point
    local -a byte=($hex)
    n=${#byte[@]}
    ((n >= 4)) || return 1
    len=$((0x${byte[2]} << 8 | 0x${byte[3]}))
    ((len + 4 < n)) && n=$((len + 4))
    i=4
    while ((i + 4 <= n)); do
        b0=$((0x${byte[i]}))
        b1=$((0x${byte[i + 1]}))
        desc_len=$((0x${byte[i + 3]}))
        type=$((b1 & 0x0f))
        assoc=$(((b1 >> 4) & 0x03))
        if ((type == 3 && assoc == 0 && (b0 & 0x0f) == 1 && desc_len > 0 && i + 4 + desc_len <= n)); then
            out="naa."
            local j
            for ((j = i + 4; j < i + 4 + desc_len; j++)); do
                out+="${byte[j]}"
            done
            printf '%s' "${out,,}"
            return 0
        fi
        i=$((i + 4 + desc_len))
    done
    return 1
}

# ---- teardown -----------------------------------------------------------

# Removes a backstore directory and its HBA directory when that is empty.
stp_remove_backstore() {
    local d="$1"
    [[ -d "$d" ]] || return 0
    rmdir "$d" 2>/dev/null || die "cannot remove backstore ${d#"$STP_TARGET_CFS"/} (still in use?)"
    rmdir "${d%/*}" 2>/dev/null || true
}

# Removes the fileio backstore at $1 and its backing file.
stp_remove_fileio() {
    local d="$1" fs
    fs="$(stp_fd_file_size "$d" || true)"
    stp_remove_backstore "$d"
    [[ -n "$fs" ]] && rm -f "${fs%% *}"
    return 0
}

# Removes STG $1's set-up: its iSCSI and tcm_loop targets (with every LUN in them),
# its user backstores (unlinked wherever they are linked), and the ramdisk
# and the fileio backstore when nothing links them any more.
stp_teardown() {
    local id="$1" wwn d rd
    while IFS= read -r wwn; do
        say "deleting iSCSI target $wwn (its sessions are dropped)"
        stp_delete_iscsi_target "$wwn"
    done < <(stp_iscsi_targets "$id")
    while IFS= read -r wwn; do
        say "deleting tcm_loop target $wwn"
        stp_delete_loop_target "$wwn"
    done < <(stp_loop_targets "$id")
    while IFS= read -r d; do
        stp_unlink_backstore_everywhere "$(stp_bs_key "$d")"
        say "deleting user backstore ${d#"$STP_TARGET_CFS"/core/}"
        stp_remove_backstore "$d"
    done < <(stp_user_backstores "$id")
    rmdir "$(stp_hba_dir "$id")" 2>/dev/null || true
    if rd="$(stp_rd_path)"; then
        if stp_backstore_linked "$(stp_bs_key "$rd")"; then
            say "keeping ramdisk $STP_RD_NAME: other targets still use it"
        else
            say "deleting ramdisk ${rd#"$STP_TARGET_CFS"/core/}"
            stp_remove_backstore "$rd"
        fi
    fi
    if rd="$(stp_fd_path)"; then
        if stp_backstore_linked "$(stp_bs_key "$rd")"; then
            say "keeping fileio $STP_FD_NAME: other targets still use it"
        else
            say "deleting fileio ${rd#"$STP_TARGET_CFS"/core/} and its file"
            stp_remove_fileio "$rd"
        fi
    fi
}
