# Bytes written to the echo port come back byte-exact; open/close cycles are sessions.
. /tests/_lib.sh
P=/dev/virtio-ports/${E2E_PORTNAME:-org.vhostser.echo}
[ -e "$P" ] || { echo "E2E-ERROR $P missing"; exit 1; }
KIB=${E2E_KIB:-1024}
dd if=/dev/urandom of=/tmp/in bs=1024 count="$KIB" 2>/dev/null
for cycle in 1 2; do
  exec 3<>"$P"
  cat /tmp/in >&3 &
  w=$!
  dd iflag=fullblock bs=1024 count="$KIB" <&3 of=/tmp/out 2>/dev/null
  wait $w
  exec 3<&-
  a=$(sha256sum </tmp/in | cut -d' ' -f1); b=$(sha256sum </tmp/out | cut -d' ' -f1)
  echo "E2E-METRIC cycle=$cycle kib=$KIB in=$a out=$b"
  [ "$a" = "$b" ] || exit 2
done
