# A host peer going away gives the guest EOF; a peer coming back is the same session.
# Round 1: the guest reads org.vhostser.data to EOF (the host sends a line, then a bulk tail,
# and hangs up at once: every byte must come before the EOF).
# Round 2: the guest polls until a new peer sends a line, answers "ack LINE", reads to EOF.
. /tests/_lib.sh
P=/dev/virtio-ports/org.vhostser.data
[ -e "$P" ] || { echo "E2E-ERROR $P missing"; exit 1; }
exec 3<>"$P" || exit 2
echo "E2E-MARK eof-open"
cat <&3 >/tmp/r1; rc1=$?
got1=$(head -n1 /tmp/r1)
echo "E2E-METRIC round=1 got=\"$got1\" rc=$rc1 bytes=$(wc -c </tmp/r1) sha=$(sha256sum </tmp/r1 | cut -d' ' -f1)"
echo "E2E-MARK eof-1"
# No peer now: reads return EOF at once. Poll until one is back and has sent a line.
n=0
while ! read -r got2 <&3; do
  n=$((n + 1))
  [ $n -lt 400 ] || { echo "E2E-ERROR no second peer"; exit 3; }
  sleep 0.1
done
echo "ack $got2" >&3
rest=$(cat <&3); rc2=$?
echo "E2E-METRIC round=2 got=\"$got2\" rest=\"$rest\" rc=$rc2 polls=$n"
exec 3<&-
[ "$got1" = line-one ] && [ "$got2" = line-two ] && [ -z "$rest" ]
