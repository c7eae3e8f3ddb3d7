#!/bin/sh
# vmrun agent: PID 1 of vmrun's initramfs, run by busybox ash.
#
# Protocol (see vmrun/channel.py for the host side). Host -> guest on port vmrun.control,
# one request per command, one field per line, values escaped for printf %b:
#   disk   root N|squashfs   mount 9p|virtiofs TAG ro|rw PATH   net user   cwd PATH
#   env K=V   arg A   user UID GID   token HEX   stdin port|null|file N   tty ROWS COLS   run
# and, first after a warm start (restored from a memory template, see vmrun/warm):
#   seed HEX   clock EPOCH
# then either another request, "sync" (answered "synced" once the guest's filesystems
# are synced; the host then ends QEMU) or "poweroff". Guest -> host on port vmrun.status:
#   "ready" once, then per command "started" and "exit N". After the command, the
# agent writes TOKEN to the stdout and stderr ports so the host knows it has every byte.
# "root N" (first request only, before the mounts) mounts /dev/vdaN at /mnt/root; from
# then on the share is mounted inside it and every command runs chrooted there. When
# that fails, each command is answered "fail REASON" instead of "started" and not run.
# "root squashfs" (an OCI image) mounts /dev/vda as a read-only squashfs under an overlay
# whose upper layer is a tmpfs: writes live in guest memory and vanish with the VM.
# "user UID GID" runs that command with those numeric ids (no supplementary groups), in
# the image's root or in the initramfs alike.
# Nothing here ever evaluates what the host sent as shell code: values only become
# arguments, environment entries and paths.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
umask 022
/bin/busybox --install -s

say() { echo "vmrun-agent: $*" > /dev/console; }
die() { say "$*"; sync; poweroff -f; sleep 5; }

# One exec for all mounts: every fork+exec costs milliseconds under TCG.
mount -t devtmpfs -o nosuid dev /dev 2>/dev/null || no_devtmpfs=1
mkdir -p /dev/pts /dev/shm
mount -a
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname vmrun

loaded=
load_modules() {
    [ -f "$1" ] || return 0
    case $loaded in *" $1 "*) return 0 ;; esac
    loaded="$loaded $1 "
    while IFS= read -r ko; do
        [ -n "$ko" ] && insmod "$ko" 2>/dev/null
    done < "$1"
}
has_fs() {
    local a b
    while read -r a b; do
        [ "$a" = "$1" ] || [ "$b" = "$1" ] && return 0
    done < /proc/filesystems
    return 1
}

# ---- what a kernel of the user's lacks (README, "Your own kernel") ----
# Run at boot only with vmrun.check (--kernel), and when the channel never appears: a
# normal boot pays one test of the command line. Found gaps go to the console as one line,
# "vmrun-agent: missing CONFIG_A CONFIG_B", which the host turns into its error.
in_set() {
    local ko
    while read -r ko; do
        [ "${ko##*/}" = "$1.ko" ] && return 0
    done < "/etc/vmrun/modules.$2"
    return 1
}
# $1 driver (module) name, $2 module set, $3 option: bound or loadable, else missing.
need_driver() {
    [ -d "/sys/bus/virtio/drivers/$1" ] || in_set "$1" "$2" || missing="$missing $3"
}
kernel_missing() {
    local d id any= transport
    missing=
    [ -n "$no_devtmpfs" ] && missing=" CONFIG_DEVTMPFS"
    [ -d /sys/class/virtio-ports ] || missing="$missing CONFIG_VIRTIO_CONSOLE"
    for d in /sys/bus/virtio/devices/*; do
        [ -r "$d/device" ] || continue
        any=1
        read -r id < "$d/device"
        case $id in
            0x0001) need_driver virtio_net net CONFIG_VIRTIO_NET ;;
            0x0002) need_driver virtio_blk blk CONFIG_VIRTIO_BLK ;;
            0x0009) need_driver 9pnet_virtio 9p CONFIG_NET_9P_VIRTIO
                    has_fs 9p || in_set 9p 9p || missing="$missing CONFIG_9P_FS" ;;
            0x001a) need_driver virtiofs virtiofs CONFIG_VIRTIO_FS ;;
        esac
    done
    if [ -z "$any" ]; then
        read -r transport < /etc/vmrun/transport
        missing="$missing $transport"
    fi
    missing=${missing# }
}
check_kernel() {
    local i
    # Devices a driver has yet to probe may still come: a short grace, only when short.
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        kernel_missing
        [ -z "$missing" ] && return 0
        usleep 50000
    done
    die "missing $missing"
}

# eth0 up with QEMU's user-mode network's address and route, once.
link_up() {
    [ -n "$link_ready" ] && return 0
    load_modules /etc/vmrun/modules.net
    for i in 1 2 3 4 5 6 7 8 9 10; do
        [ -e /sys/class/net/eth0 ] && break
        usleep 10000
    done
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 &&
        ip route add default via 10.0.2.2 && link_ready=1
}
read -r cmdline < /proc/cmdline
if [ "${cmdline#* vmrun.probe}" != "$cmdline" ]; then
    echo vmrun-probe-ok > /dev/console
    poweroff -f
fi

load_modules /etc/vmrun/modules.boot
[ "${cmdline#* vmrun.check}" != "$cmdline" ] && check_kernel
ip link set lo up 2>/dev/null
if [ "${cmdline#* vmrun.warm}" != "$cmdline" ]; then
    # A boot that may become a template: what a restored copy would load after restore,
    # where every code path is translated afresh under TCG, is loaded now.
    load_modules /etc/vmrun/modules.9p
    load_modules /etc/vmrun/modules.net
    # With a block device (virtio id 2): its filesystems, and its driver loaded but never
    # bound (the bus's autoprobe off meanwhile). A bound virtio_blk would read this run's
    # partition table into the template, and each copy attaches a disk of its own: a copy
    # binds the driver at its first request (start_disk) and reads its own.
    if grep -qx 0x0002 /sys/bus/virtio/devices/*/device 2>/dev/null; then
        load_modules /etc/vmrun/modules.fs
        load_modules /etc/vmrun/modules.oci
        if echo 0 > /sys/bus/virtio/drivers_autoprobe; then
            load_modules /etc/vmrun/modules.blk
            echo 1 > /sys/bus/virtio/drivers_autoprobe
        fi
    fi
    # With a network device (virtio id 1): its address and route now, the same in every
    # copy (each copy's QEMU has a user-mode network of its own), so that a copy's first
    # request does not translate `ip` and netlink afresh.
    grep -qx 0x0001 /sys/bus/virtio/devices/*/device 2>/dev/null && link_up
    if [ ! -x /sbin/vmrun-reseed ]; then
        # No reseed helper for this architecture: a suspend cycle that stops once tasks
        # are frozen reseeds instead (random.c reseeds on PM_POST_SUSPEND).
        echo 0 > /sys/module/suspend/parameters/pm_test_delay
        echo freezer > /sys/power/pm_test
    fi
fi

# seed HEX: mix the host's entropy into the input pool, then make the generator reseed
# from it (copies of one template would otherwise read the same bytes): vmrun-reseed
# issues RNDRESEEDCRNG, which busybox cannot (vmrun/guest/reseed.py). clock EPOCH: the
# host's time (a template's clock stopped when it was made).
reseed() {
    case $1 in ''|*[!0-9a-f]*) say "bad seed"; return ;; esac
    printf '%s\n' "$1" > /dev/urandom
    if [ -x /sbin/vmrun-reseed ]; then
        /sbin/vmrun-reseed < /dev/urandom || say "cannot reseed the kernel's RNG"
    else
        echo freeze > /sys/power/state 2>/dev/null || say "cannot reseed the kernel's RNG"
    fi
}
set_clock() {
    case $1 in ''|*[!0-9]*) say "bad clock"; return ;; esac
    date -s "@$1" > /dev/null || say "cannot set the clock"
}

start_net() {
    link_up
    echo "nameserver 10.0.2.3" > /etc/resolv.conf
    if [ -n "$root" ] && inroot /etc/resolv.conf; then
        # Through the image's symlink, if it has one (into our fresh /run, on Ubuntu).
        [ -d "${v%/*}" ] || mkdir -p "${v%/*}"
        echo "nameserver 10.0.2.3" > "$v"
    fi
}


# Ports appear when the host's virtio-serial announces them, shortly after the driver binds.
ctl= status= out= err= inp=
tries=0
while :; do
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] || continue
        dev=/dev/${p##*/}
        [ -c "$dev" ] || continue
        read -r name < "$p/name"
        case $name in
            vmrun.control) ctl=$dev ;;
            vmrun.status) status=$dev ;;
            vmrun.stdout) out=$dev ;;
            vmrun.stderr) err=$dev ;;
            vmrun.stdin) inp=$dev ;;
        esac
    done
    [ -n "$ctl" ] && [ -n "$status" ] && [ -n "$out" ] && [ -n "$err" ] && [ -n "$inp" ] && break
    tries=$((tries + 1))
    if [ "$tries" -gt 2000 ]; then
        kernel_missing
        [ -n "$missing" ] && die "missing $missing"
        die "channel ports did not appear"
    fi
    usleep 5000
done

exec 3< "$ctl" 4> "$status" 5> "$out" 6> "$err"

unescape() {
    v=$(printf '%bx' "$1")
    v=${v%x}
}

mount_share() {
    # $1 type, $2 tag, $3 ro|rw, $4 path
    mkdir -p "$4" || return 1
    case $1 in
        9p) load_modules /etc/vmrun/modules.9p
            mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,$3" "$2" "$4" ;;
        virtiofs) load_modules /etc/vmrun/modules.virtiofs
            mount -t virtiofs -o "$3" "$2" "$4" ;;
    esac
}


start_disk() {
    local d id
    [ -b /dev/vda ] && return 0
    if [ -d /sys/bus/virtio/drivers/virtio_blk ]; then
        # Loaded but unbound (a template's boot): bind it to the block device, no exec.
        for d in /sys/bus/virtio/devices/*; do
            read -r id < "$d/device" && [ "$id" = 0x0002 ] && [ ! -e "$d/driver" ] &&
                echo "${d##*/}" > /sys/bus/virtio/drivers/virtio_blk/bind
        done
    fi
    load_modules /etc/vmrun/modules.blk
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        [ -b /dev/vda ] && return 0
        usleep 10000
    done
    say "the disk /dev/vda did not appear"
}

# The image's root, once mounted ("" before, and for good when mounting it failed); root_sh
# is 1 when it has a /bin/sh (an OCI image need not: a distroless one has only its program).
root= root_failure= root_sh=

# Resolve $1, an absolute path inside the root, to the path the agent sees (in v), with
# every symlink followed inside the root: an absolute link starts again at the root and
# ".." stops there, as the command in the chroot will see it. Components that do not
# exist are kept, so the caller can create them.
inroot() {
    local rest="$1" got= hops=0 part link
    while [ -n "$rest" ]; do
        part=${rest%%/*}
        case $rest in */*) rest=${rest#*/} ;; *) rest= ;; esac
        case $part in
            ''|.) continue ;;
            ..) got=${got%/*}; continue ;;
        esac
        if [ -L "$root$got/$part" ]; then
            hops=$((hops + 1))
            [ "$hops" -le 40 ] || return 1
            link=$(readlink "$root$got/$part") || return 1
            case $link in /*) got= ;; esac
            rest=$link/$rest
        else
            got=$got/$part
        fi
    done
    v=$root$got
}

# root N: mount /dev/vdaN (on the run's overlay, read-write) with what a command expects
# around it. On failure root stays empty and root_failure says why.
start_root() {
    local dev=/dev/vda$1 types= fs
    start_disk
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        [ -b "$dev" ] && break
        usleep 10000
    done
    [ -b "$dev" ] || { say "$dev did not appear"; root_failure=root-absent; return; }
    load_modules /etc/vmrun/modules.fs
    mkdir -p /mnt/root
    if ! mount -t ext4 "$dev" /mnt/root 2>/dev/null; then
        load_modules /etc/vmrun/modules.xfs
        for fs in xfs btrfs; do
            has_fs "$fs" && types=${types:+$types,}$fs
        done
        if [ -z "$types" ] || ! mount -t "$types" "$dev" /mnt/root 2>/dev/console; then
            say "cannot mount $dev as ext4${types:+,$types}"
            root_failure=root-mount
            return
        fi
    fi
    finish_root "$dev" required
}

# root squashfs: /dev/vda read-only below, a tmpfs above, the overlay of both as the root.
start_squashfs_root() {
    start_disk
    [ -b /dev/vda ] || { root_failure=root-absent; return; }
    load_modules /etc/vmrun/modules.oci
    # The overlay's upper layer lives in /run's tmpfs. One mount -a for both mounts (in
    # order).
    mkdir -p /mnt/lower /mnt/root /run/vmrun-rw/upper /run/vmrun-rw/work
    printf '%s\n' "/dev/vda /mnt/lower squashfs ro 0 0" \
        "root /mnt/root overlay lowerdir=/mnt/lower,upperdir=/run/vmrun-rw/upper,workdir=/run/vmrun-rw/work 0 0" \
        > /run/vmrun-squashfs.fstab
    if ! mount -a -T /run/vmrun-squashfs.fstab 2>/dev/console; then
        say "cannot mount /dev/vda as a squashfs root with an overlay"
        root_failure=root-squashfs
        return
    fi
    finish_root /dev/vda optional
}

# The root at /mnt/root is mounted: check it has a shell ($2: required or optional), then
# mount what commands expect.
finish_root() {
    local dev=$1 entry
    # An absolute /bin/sh link is resolved against the initramfs by [ -e ]; [ -L ] takes
    # it as is, and only when both fail does the image's own shell get asked.
    if [ -e /mnt/root/bin/sh ] || [ -L /mnt/root/bin/sh ] ||
       chroot /mnt/root /bin/sh -c : 2>/dev/null; then
        root_sh=1
    elif [ "$2" = required ]; then
        umount /mnt/root
        say "$dev has no /bin/sh"
        root_failure=root-shell
        return
    fi
    root=/mnt/root
    # One mount -a for the API filesystems, from a table of the resolved mount points
    # (an image with odd names there gets one mount each instead).
    : > /run/vmrun-root.fstab
    for entry in "proc /proc proc nosuid,nodev,noexec" "sys /sys sysfs nosuid,nodev,noexec" \
                 "/dev /dev none rbind" "run /run tmpfs nosuid,nodev,mode=755"; do
        set -- $entry
        inroot "$2" || continue
        [ -d "$v" ] || mkdir -p "$v"
        case $v in
            *[!A-Za-z0-9/._-]*) mount -t "$3" -o "$4" "$1" "$v" ;;
            *) echo "$1 $v $3 $4 0 0" >> /run/vmrun-root.fstab ;;
        esac
    done
    mount -a -T /run/vmrun-root.fstab || say "cannot mount /proc, /sys, /dev or /run in the root"
    if inroot /tmp && [ ! -d "$v" ]; then
        mkdir -p "$v" && chmod 1777 "$v"
    fi
}

# For a root without a shell: the path to exec for the command $1 (in v), found like
# execve and a shell's PATH search, never evaluated. A name with a "/" is itself (relative
# to the cwd, which nsenter enters first); a bare name is looked up on $PATH (relative
# entries from the cwd $2), each candidate resolved inside the root: the first executable
# regular file wins. It is exec'd by that path (busybox would run its own applet for a name).
find_command() {
    local rest="$PATH:" dir
    case $1 in
        */*) v=$1; return 0 ;;
        '') return 1 ;;
    esac
    while [ -n "$rest" ]; do
        dir=${rest%%:*}
        rest=${rest#*:}
        case $dir in /*) ;; *) dir=${2%/}/${dir:-.} ;; esac
        if inroot "$dir/$1" && [ -f "$v" ] && [ -x "$v" ]; then
            v=${dir%/}/$1
            return 0
        fi
    done
    return 1
}

# The command runs in a subshell that replays the request from a file: env and argv are
# applied there, so nothing of them leaks into the agent between commands.
run_command() {
    (
        export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        unset TERM
        cwd=/ ids=
        set --
        while IFS= read -r line; do
            key=${line%% *}
            val=${line#* }
            case $key in
                cwd) unescape "$val"; cwd=$v ;;
                env) unescape "$val"; export "$v" ;;
                arg) unescape "$val"; set -- "$@" "$v" ;;
                user) case $val in
                          [0-9]*' '[0-9]*) ;;
                          *) exit 126 ;;
                      esac
                      case ${val%% *}${val#* } in *[!0-9]*) exit 126 ;; esac
                      ids="-S ${val%% *} -G ${val#* }" ;;
            esac
        done < /run/vmrun-request
        if [ -n "$root" ]; then
            inroot "$cwd" || exit 126
            [ -d "$v" ] || mkdir -p -- "$v"
            # nsenter enters the root and the cwd, then drops to the ids; the image's own
            # shell finds the command on its PATH: busybox (its chroot and nsenter alike)
            # would run an applet of that name. Without a shell, find_command does.
            if [ -n "$root_sh" ]; then
                set -- /bin/busybox nsenter --root="$root" --wd="$v" $ids /bin/sh -c \
                    'exec "$@"' sh "$@"
            else
                wd=$v
                find_command "$1" "$cwd" || { echo "$1: not found" >&2; exit 127; }
                shift
                set -- /bin/busybox nsenter --root="$root" --wd="$wd" $ids -- "$v" "$@"
            fi
        else
            [ -d "$cwd" ] || mkdir -p -- "$cwd"
            cd -- "$cwd" || exit 126
            # Numeric ids need no account: nsenter without namespaces only drops to them.
            [ -z "$ids" ] || set -- /bin/busybox nsenter $ids -- "$@"
        fi
        if [ -n "$tty" ]; then
            exec /bin/busybox setsid -c "$@"
        fi
        exec "$@"
    )
}

# What the guest wrote reaches its disk and shares; the root read-only first, so that its
# journal is clean on the overlay.
settle() {
    [ -n "$root" ] && mount -o remount,ro "$root" 2>/dev/null
    sync
}

mkdir -p /root
said_ready=
while :; do
    : > /run/vmrun-request
    token= stdin_mode=null stdin_len=0 tty=
    # "ready" only here, with the whole script read and nothing left to run but the read
    # below: a template is taken when the host sees it, so that its copies start at that
    # read instead of running (and, under TCG, translating) the rest of the boot afresh.
    [ -n "$said_ready" ] || { said_ready=1; echo ready >&4; }
    while IFS= read -r line <&3; do
        key=${line%% *}
        val=${line#* }
        case $key in
            poweroff) settle; poweroff -f; sleep 5 ;;
            sync) settle; echo synced >&4 ;;  # the host then quits QEMU, which flushes the disk
            run) break ;;
            seed) reseed "$val" ;;
            clock) set_clock "$val" ;;
            token) token=$val ;;
            stdin) stdin_mode=${val%% *}; stdin_len=${val#* } ;;
            tty) tty=$val ;;
            net) start_net ;;
            disk) start_disk ;;
            root)
                case $val in
                    squashfs) [ -n "$root" ] || start_squashfs_root ;;
                    ''|*[!0-9]*) root_failure=root-absent ;;
                    *) [ -n "$root" ] || start_root "$val" ;;
                esac
                ;;
            mount)
                set -- $val
                unescape "$4"
                # Inside the root, at the same path, when there is one.
                if [ -n "$root" ] && ! inroot "$v"; then
                    say "cannot resolve $v in the root"
                else
                    mount_share "$1" "$2" "$3" "$v" || say "cannot mount share $2 at $v"
                fi
                ;;
            *) echo "$line" >> /run/vmrun-request ;;
        esac
    done
    # The host never closes the control port while the VM runs: EOF means it is gone.
    [ -n "$token" ] || die "control channel closed"

    if [ -n "$root_failure" ]; then
        if [ "$stdin_mode" = file ] && [ "$stdin_len" -gt 0 ]; then
            dd bs="$stdin_len" count=1 iflag=fullblock of=/dev/null <&3 2>/dev/null
        fi
        echo "fail $root_failure" >&4
        continue
    fi
    echo started >&4
    if [ -n "$tty" ]; then
        stty -F /dev/hvc0 sane rows "${tty%% *}" cols "${tty#* }" 2>/dev/null
        run_command < /dev/hvc0 > /dev/hvc0 2>&1
        rc=$?
    else
        case $stdin_mode in
            port) run_command < "$inp" >&5 2>&6 ;;
            file) : > /run/vmrun-stdin
                if [ "$stdin_len" -gt 0 ]; then
                    dd bs="$stdin_len" count=1 iflag=fullblock of=/run/vmrun-stdin <&3 2>/dev/null
                fi
                run_command < /run/vmrun-stdin >&5 2>&6 ;;
            *) run_command < /dev/null >&5 2>&6 ;;
        esac
        rc=$?
    fi
    rm -f /run/vmrun-stdin
    printf '%s' "$token" >&5
    printf '%s' "$token" >&6
    echo "exit $rc" >&4
done
