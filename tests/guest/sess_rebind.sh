# Driver rebind (unbind + bind of virtio_console) while the echo, data and framed ports are
# open; afterwards every port works again. The host says "go" on org.vhostser.data.
. /tests/_lib.sh
DRV=/sys/bus/virtio/drivers/virtio_console
dev=""
for v in /sys/bus/virtio/devices/virtio*; do
  [ "$(cat "$v/device")" = 0x0003 ] && dev=$(basename "$v")
done
[ -n "$dev" ] || { echo "E2E-ERROR no virtio console device"; exit 1; }
# /init made the /dev/virtio-ports links at boot only: remake them from sysfs.
relink() {
  rm -f /dev/virtio-ports/*
  for p in /sys/class/virtio-ports/vport*; do
    [ -e "$p" ] || continue
    nm=$(cat "$p/name" 2>/dev/null)
    [ -n "$nm" ] && ln -sf "../$(basename "$p")" "/dev/virtio-ports/$nm"
  done
}
wait_names() {  # every name in $@ present under /sys/class/virtio-ports, within 20 s
  i=0
  while [ $i -lt 200 ]; do
    ok=1
    for nm in "$@"; do
      cat /sys/class/virtio-ports/vport*/name 2>/dev/null | grep -qx "$nm" || ok=0
    done
    [ $ok = 1 ] && { relink; return 0; }
    i=$((i + 1)); sleep 0.1
  done
  return 1
}
V=/dev/virtio-ports
exec 3<>$V/org.vhostser.echo 4<>$V/org.vhostser.data 5<>$V/org.vhostser.framed || exit 2
echo before >&3; read -r e <&3
echo "E2E-METRIC phase=before echo=$e dev=$dev ports=\"$(ls /sys/class/virtio-ports | tr '\n' ' ')\""
[ "$e" = before ] || exit 3
echo "E2E-MARK rebind-open"
read -r go <&4
[ "$go" = go ] || { echo "E2E-ERROR host said '$go'"; exit 4; }
echo "$dev" > $DRV/unbind || exit 5
echo "E2E-MARK unbound ports=\"$(ls /sys/class/virtio-ports 2>/dev/null | tr '\n' ' ')\""
sleep 0.5
echo "$dev" > $DRV/bind || exit 6
wait_names org.vhostser.echo org.vhostser.data org.vhostser.framed || {
  echo "E2E-ERROR ports did not come back"; ls -l /sys/class/virtio-ports; exit 7; }
echo "E2E-MARK bound ports=\"$(ls /sys/class/virtio-ports | tr '\n' ' ')\""
# The fds of the old driver instance are dead; close them.
exec 3<&- 4<&- 5<&-
rc=0
# echo port: round trip
exec 3<>$V/org.vhostser.echo || exit 8
echo after >&3; read -r e <&3; exec 3<&-
[ "$e" = after ] || rc=9
# framed port: a new session; the host replies in it
exec 5<>$V/org.vhostser.framed || exit 10
echo framed-after >&5; read -r f <&5; exec 5<&-
[ "$f" = framed-reply ] || rc=11
# data port: the same host peer as before the rebind
exec 4<>$V/org.vhostser.data || exit 12
echo data-after >&4; read -r d <&4; exec 4<&-
[ "$d" = data-reply ] || rc=13
# console port (hvc0): a line for the host's console log
exec 6<>"$(e2e_hvc)" && e2e_raw 6 && echo "console-after-rebind" >&6
sleep 0.2
exec 6<&-
echo "E2E-METRIC phase=after echo=$e framed=\"$f\" data=\"$d\""
exit $rc
