#!/bin/sh
# vmrun's run hook, installed by `vmrun image bake` (see vmrun/runhook.py) and started by
# the unit its generator adds, as soon as the local file systems are mounted.
#
# On a vmrun run the virtio-serial port org.vmrun.ssh brings, before anything else:
#
#     vmrun-run 1
#     user NAME                  the login user (made here if the image lacks it)
#     key AUTHORIZED_KEY         the run's client key, one authorized_keys line
#     hostkey BASE64             the run's host key (OpenSSH private key), base64 on one line
#     end
#
# and then the SSH client's bytes: the hook serves that one connection with the image's own
# sshd in inetd mode on the port, so the login needs neither cloud-init nor the network.
# It says "ssh serial" on org.vmrun.ready first. Anything else (no such port: not a vmrun
# run; a port that brings no header: a bake) leaves the boot as it is.
#
# VMRUN_HOOK_ROOT prefixes the paths it reads and writes (for tests; empty in a guest).
set -u
root=${VMRUN_HOOK_ROOT:-}

port_of() {  # the /dev node of the virtio-serial port named $1, if there is one
    for name in "$root"/sys/class/virtio-ports/*/name; do
        [ -r "$name" ] || continue
        if [ "$(cat "$name")" = "$1" ]; then
            dir=${name%/name}
            echo "$root/dev/${dir##*/}"
            return 0
        fi
    done
    return 1
}

# No virtio console device (virtio id 3): not a vmrun run, nothing to wait for.
console=
for id in "$root"/sys/bus/virtio/devices/*/device; do
    [ "$(cat "$id" 2>/dev/null)" = 0x0003 ] && console=yes
done
[ -n "$console" ] || exit 0
modprobe -q virtio_console 2>/dev/null
tries=0
# The ports appear shortly after the driver binds; a machine whose ports are others' (not
# vmrun's) is given 5 s.
while :; do
    if port=$(port_of org.vmrun.ssh) && { [ -c "$port" ] || [ -f "$port" ]; }; then
        break
    fi
    tries=$((tries + 1))
    [ "$tries" -le 50 ] || exit 0
    sleep 0.1
done

exec 3<>"$port"
IFS=' ' read -r magic version <&3 || exit 0
[ "$magic" = vmrun-run ] && [ "$version" = 1 ] || { echo "vmrun-run-hook: no run header" >&2; exit 0; }
user= key= hostkey=
while IFS=' ' read -r field value <&3; do
    case $field in
        user) user=$value ;;
        key) key=$value ;;
        hostkey) hostkey=$value ;;
        end) break ;;
        *) echo "vmrun-run-hook: unknown header field $field" >&2; exit 1 ;;
    esac
done
case $user in
    '' | *[!a-z0-9_-]* | -*) echo "vmrun-run-hook: bad user name" >&2; exit 1 ;;
esac
[ -n "$key" ] && [ -n "$hostkey" ] || { echo "vmrun-run-hook: header lacks a key" >&2; exit 1; }

state=$root/run/vmrun
mkdir -p "$state" && chmod 0755 "$state" || exit 1
(umask 077 && printf '%s\n' "$hostkey" | base64 -d > "$state/ssh_host_ed25519_key") || exit 1
printf '%s\n' "$key" > "$state/authorized_keys" && chmod 0644 "$state/authorized_keys" || exit 1

if ! grep -q "^$user:" "$root/etc/passwd"; then
    # "*" matches no password but is not a lock, which sshd without PAM would refuse.
    useradd --create-home --shell /bin/sh --password '*' "$user" || exit 1
fi
sudoers=$root/etc/sudoers.d
if [ -d "$sudoers" ]; then
    (umask 0337 && printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$user" > "$sudoers/90-vmrun-run")
fi
mkdir -p "$root/run/sshd" && chmod 0755 "$root/run/sshd"
# The resolver the image uses may not run yet: its own name resolves from /etc/hosts (else
# sudo, for one, warns on every call).
host=$(cat "$root/proc/sys/kernel/hostname" 2>/dev/null) || host=
if [ -n "$host" ] && ! grep -qw -e "$host" "$root/etc/hosts" 2>/dev/null; then
    printf '127.0.1.1\t%s\n' "$host" >> "$root/etc/hosts"
fi

sshd=$root/usr/sbin/sshd
[ -x "$sshd" ] || sshd=$(command -v sshd) || exit 1
set -- -e -h "$state/ssh_host_ed25519_key" \
    -o AuthorizedKeysFile="$state/authorized_keys" -o UsePAM=no \
    -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
    -o PermitRootLogin=no -o AllowUsers="$user" -o LoginGraceTime=0
# Whatever fails before the announcement leaves the login to the usual path (TCP).
"$sshd" -t "$@" </dev/null || exit 1
if ready=$(port_of org.vmrun.ready); then
    echo "ssh serial" > "$ready" 2>/dev/null
fi
exec "$sshd" -i "$@" <&3 >&3
