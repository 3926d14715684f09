# Bulk both ways on org.vhostser.data, byte-exact (sha256 on both sides), one session.
# g2h: $E2E_MIB MiB of /dev/urandom, written with cat; then "R" (ready to read);
# h2g: the host's $E2E_MIB MiB read with dd into /tmp/out; then "A" (all read).
# Guest-side times come from /proc/uptime (10 ms resolution). $E2E_HOLD=NAME: keep that port
# open (fd 5) for the whole transfer (a session that must survive whatever the host does).
. /tests/_lib.sh
P=/dev/virtio-ports/org.vhostser.data
[ -e "$P" ] || { echo "E2E-ERROR $P missing"; exit 1; }
MIB=${E2E_MIB:-64}
mbps() { awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { d = b - a; if (d <= 0) d = 0.01; printf "%.1f", m * 1.048576 / d }'; }
dd if=/dev/urandom of=/tmp/in bs=1048576 count="$MIB" 2>/dev/null || exit 2
in=$(sha256sum </tmp/in | cut -d' ' -f1)
if [ -n "$E2E_HOLD" ]; then
  exec 5<>"/dev/virtio-ports/$E2E_HOLD" || exit 6
  echo "E2E-MARK holding $E2E_HOLD"
fi
exec 3<>"$P"
echo "E2E-MARK g2h-start"
t0=$(e2e_now)
cat /tmp/in >&3 || exit 3
t1=$(e2e_now)
rm -f /tmp/in
echo "E2E-METRIC dir=g2h mib=$MIB sha=$in guest_s=$(awk -v a=$t0 -v b=$t1 'BEGIN{print b-a}') guest_MBps=$(mbps "$MIB" "$t0" "$t1")"
printf R >&3
echo "E2E-MARK h2g-start"
t2=$(e2e_now)
dd iflag=fullblock bs=65536 count=$((MIB * 16)) <&3 of=/tmp/out 2>/dev/null || exit 4
t3=$(e2e_now)
printf A >&3
n=$(wc -c </tmp/out)
out=$(sha256sum </tmp/out | cut -d' ' -f1)
echo "E2E-METRIC dir=h2g mib=$MIB bytes=$n sha=$out guest_s=$(awk -v a=$t2 -v b=$t3 'BEGIN{print b-a}') guest_MBps=$(mbps "$MIB" "$t2" "$t3")"
exec 3<&-
if [ -n "$E2E_HOLD" ]; then exec 5<&-; fi
[ "$n" = $((MIB * 1048576)) ] || exit 5
