#!/bin/sh
# vmrun agent: PID 1 of vmrun's initramfs, run by busybox ash.
#
# Protocol (see vmrun/channel.py for the host side). Host -> guest on port vmrun.control,
# one request per command, one field per line, values escaped for printf %b:
#   mount 9p|virtiofs TAG ro|rw PATH   net user   disk   cwd PATH   env K=V   arg A
#   token HEX   stdin port|null|file N   tty ROWS COLS   run
# then either another request or "poweroff". Guest -> host on port vmrun.status:
#   "ready" once, then per command "started" and "exit N". After the command, the
# agent writes TOKEN to the stdout and stderr ports so the host knows it has every byte.
# Nothing here ever evaluates what the host sent as shell code: values only become
# arguments, environment entries and paths.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
umask 022
/bin/busybox --install -s

say() { echo "vmrun-agent: $*" > /dev/console; }
die() { say "$*"; sync; poweroff -f; sleep 5; }

# One exec for all mounts: every fork+exec costs milliseconds under TCG.
mount -t devtmpfs -o nosuid dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -a
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname vmrun

load_modules() {
    [ -f "$1" ] || return 0
    while IFS= read -r ko; do
        [ -n "$ko" ] && insmod "$ko" 2>/dev/null
    done < "$1"
}
read -r cmdline < /proc/cmdline
if [ "${cmdline#* vmrun.probe}" != "$cmdline" ]; then
    echo vmrun-probe-ok > /dev/console
    poweroff -f
fi

load_modules /etc/vmrun/modules.boot
ip link set lo up 2>/dev/null

start_net() {
    load_modules /etc/vmrun/modules.net
    for i in 1 2 3 4 5 6 7 8 9 10; do
        [ -e /sys/class/net/eth0 ] && break
        usleep 10000
    done
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
    echo "nameserver 10.0.2.3" > /etc/resolv.conf
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
    [ "$tries" -gt 2000 ] && die "channel ports did not appear"
    usleep 5000
done

exec 3< "$ctl" 4> "$status" 5> "$out" 6> "$err"
echo ready >&4

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
    load_modules /etc/vmrun/modules.blk
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        [ -b /dev/vda ] && return 0
        usleep 10000
    done
    say "the disk /dev/vda did not appear"
}

# The command runs in a subshell that replays the request from a file: env and argv are
# applied there, so nothing of them leaks into the agent between commands.
run_command() {
    (
        export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        unset TERM
        cwd=/
        set --
        while IFS= read -r line; do
            key=${line%% *}
            val=${line#* }
            case $key in
                cwd) unescape "$val"; cwd=$v ;;
                env) unescape "$val"; export "$v" ;;
                arg) unescape "$val"; set -- "$@" "$v" ;;
            esac
        done < /run/vmrun-request
        [ -d "$cwd" ] || mkdir -p -- "$cwd"
        cd -- "$cwd" || exit 126
        if [ -n "$tty" ]; then
            exec setsid -c "$@"
        fi
        exec "$@"
    )
}

mkdir -p /root
while :; do
    : > /run/vmrun-request
    token= stdin_mode=null stdin_len=0 tty=
    while IFS= read -r line <&3; do
        key=${line%% *}
        val=${line#* }
        case $key in
            poweroff) sync; poweroff -f; sleep 5 ;;
            run) break ;;
            token) token=$val ;;
            stdin) stdin_mode=${val%% *}; stdin_len=${val#* } ;;
            tty) tty=$val ;;
            net) start_net ;;
            disk) start_disk ;;
            mount)
                set -- $val
                unescape "$4"
                mount_share "$1" "$2" "$3" "$v" || say "cannot mount share $2 at $v"
                ;;
            *) echo "$line" >> /run/vmrun-request ;;
        esac
    done
    # The host never closes the control port while the VM runs: EOF means it is gone.
    [ -n "$token" ] || die "control channel closed"

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
