# Two guest sessions on org.vhostser.framed: open, write "ping N", read the host's reply,
# close. The framed host peer answers each ping with "pong N" in that session's DATA frame.
. /tests/_lib.sh
P=/dev/virtio-ports/org.vhostser.framed
[ -e "$P" ] || { echo "E2E-ERROR $P missing"; exit 1; }
rc=0
for c in 1 2; do
  exec 3<>"$P" || exit 2
  echo "E2E-MARK framed-open cycle=$c"
  echo "ping $c" >&3
  read -r reply <&3
  exec 3<&-
  echo "E2E-METRIC cycle=$c reply=\"$reply\""
  [ "$reply" = "pong $c" ] || rc=3
  sleep 0.2
done
exit $rc
