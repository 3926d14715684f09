# Hotplug: a port the host adds at runtime appears (the guest makes its /dev/virtio-ports
# link itself: /init makes them at boot only), round-trips a line (the host side echoes it),
# and disappears when the host removes it, while the guest holds it open with a reader
# blocked on it. $E2E_NAME: the port's name; $E2E_ROUNDS: add/remove rounds (default 1).
. /tests/_lib.sh
NAME=${E2E_NAME:-org.vhostser.hot}
find_port() {
  for p in /sys/class/virtio-ports/vport*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { basename "$p"; return 0; }
  done
  return 1
}
wait_port() {  # NAME present|absent, within 30 s
  i=0
  while [ $i -lt 300 ]; do
    if find_port "$1" >/dev/null; then [ "$2" = present ] && return 0
    else [ "$2" = absent ] && return 0; fi
    i=$((i + 1)); sleep 0.1
  done
  return 1
}
find_port "$NAME" >/dev/null && { echo "E2E-ERROR $NAME exists at boot"; exit 1; }
for round in $(seq 1 "${E2E_ROUNDS:-1}"); do
  echo "E2E-MARK hot-wait round=$round"
  wait_port "$NAME" present || { echo "E2E-ERROR $NAME never appeared"; exit 2; }
  d=$(find_port "$NAME")
  i=0; while [ ! -c "/dev/$d" ] && [ $i -lt 50 ]; do i=$((i + 1)); sleep 0.1; done
  mkdir -p /dev/virtio-ports; ln -sf "../$d" "/dev/virtio-ports/$NAME"
  exec 3<>"/dev/virtio-ports/$NAME" || exit 3
  echo "hot-$round" >&3; read -r r <&3
  echo "E2E-METRIC round=$round dev=$d echo=$r"
  [ "$r" = "hot-$round" ] || exit 4
  rm -f /tmp/hot.rc
  ( cat <&3 >/tmp/hot.out; echo "$?" >/tmp/hot.rc ) &
  echo "E2E-MARK hot-open round=$round"
  wait_port "$NAME" absent || { echo "E2E-ERROR $NAME never went away"; exit 5; }
  i=0; while [ ! -e /tmp/hot.rc ] && [ $i -lt 30 ]; do i=$((i + 1)); sleep 0.1; done
  reader=$(cat /tmp/hot.rc 2>/dev/null || echo blocked)
  [ -e "/dev/$d" ] && node=kept || node=gone
  exec 3<&-
  rm -f "/dev/virtio-ports/$NAME"
  echo "E2E-METRIC round=$round removed=1 reader_rc=$reader devnode=$node"
  echo "E2E-MARK hot-gone round=$round"
done
