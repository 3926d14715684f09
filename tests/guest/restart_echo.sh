# The echo port held open for the whole test (one session) while the host restarts the
# daemon between rounds and during one: every round's bytes come back byte-exact.
. /tests/_lib.sh
P=/dev/virtio-ports/${E2E_PORTNAME:-org.vhostser.echo}
[ -e "$P" ] || { echo "E2E-ERROR $P missing"; exit 1; }
KIB=${E2E_KIB:-2048}
ROUNDS=${E2E_ROUNDS:-6}
exec 3<>"$P"
i=1
while [ "$i" -le "$ROUNDS" ]; do
  dd if=/dev/urandom of=/tmp/in bs=1024 count="$KIB" 2>/dev/null
  echo "E2E-ROUND $i"
  cat /tmp/in >&3 &
  w=$!
  dd iflag=fullblock bs=1024 count="$KIB" <&3 of=/tmp/out 2>/dev/null
  wait $w
  a=$(sha256sum </tmp/in | cut -d' ' -f1); b=$(sha256sum </tmp/out | cut -d' ' -f1)
  echo "E2E-METRIC round=$i kib=$KIB same=$([ "$a" = "$b" ] && echo 1 || echo 0)"
  [ "$a" = "$b" ] || exit 2
  echo "E2E-IDLE $i"
  sleep "${E2E_IDLE:-2}"
  i=$((i + 1))
done
exec 3<&-
