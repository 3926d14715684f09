# The guest side of a live restart: while the host kills and restarts the daemon, a
# request/response loop on the echo port (a numbered line out, the same line back) and, at the
# same time, "COUNTER n" on the console (hvc0) every 0.1 s. Every request must be answered with
# its own line; the daemon may deliver one chain twice across a crash (DESIGN.md, Continuity):
# a repeat of the previous answer is counted as a duplicate and read past, anything else fails.
# The loop ends when the host types STOP on the console, after $E2E_SECONDS (default 30) or
# after $E2E_REQUESTS requests (0: no limit), whichever comes first.
#   $E2E_SLOW_MS  report each wait at least this long as an E2E-GAP line (default 200)
#   $E2E_MIB      if set, meanwhile $E2E_MIB MiB of random bytes out on org.test.framed and
#                 $E2E_MIB MiB in from org.test.data ("R" on org.test.data when both are
#                 open); after the loop "BACK" and both files, in then out, on org.test.data,
#                 so that the host sees what the guest received and sent byte for byte; then
#                 the guest waits for END on the console before it closes the ports.
# Times are /proc/uptime in centiseconds, read without a fork (10 ms resolution).
. /tests/_lib.sh
P=/dev/virtio-ports/${E2E_PORTNAME:-org.test.echo}
[ -e "$P" ] || { echo "E2E-ERROR $P missing"; exit 1; }
exec 4<>"$(e2e_hvc)"; e2e_raw 4
exec 3<>"$P"
now() { read -r up _ </proc/uptime; NOW=${up%.*}${up#*.}; }

rm -f /tmp/stop /tmp/counter_last
MIB=${E2E_MIB:-0}
if [ "$MIB" -gt 0 ]; then
  dd if=/dev/urandom of=/tmp/out bs=65536 count=$((MIB * 16)) 2>/dev/null
  exec 5<>/dev/virtio-ports/org.test.data 6>/dev/virtio-ports/org.test.framed
  echo R >&5
  dd if=/tmp/out bs=65536 >&6 2>/dev/null &
  g2h=$!
  dd iflag=fullblock bs=65536 count=$((MIB * 16)) <&5 of=/tmp/in 2>/dev/null &
  h2g=$!
fi
(
  n=0
  while [ ! -e /tmp/stop ]; do
    echo "COUNTER $n" >&4
    n=$((n + 1))
    sleep 0.1
  done
  echo $((n - 1)) >/tmp/counter_last
) &
counter=$!
# The host ends the loop by typing STOP on the console (its live reader becomes the writer).
( read -r _ <&4; touch /tmp/stop ) &
stopper=$!

max=${E2E_REQUESTS:-0}; slow=${E2E_SLOW_MS:-200}
i=0; answered=0; dups=0; worst=0
now; end=$((NOW + ${E2E_SECONDS:-30} * 100))
echo "E2E-LOOP-START at=$NOW"
while [ ! -e /tmp/stop ] && [ "$NOW" -lt "$end" ] && { [ "$max" = 0 ] || [ "$i" -lt "$max" ]; }; do
  i=$((i + 1))
  t0=$NOW
  echo "REQ $i" >&3
  while :; do
    if ! read -r reply <&3; then echo "E2E-ERROR request $i: EOF on $P"; break 2; fi
    [ "$reply" = "REQ $((i - 1))" ] || break
    dups=$((dups + 1))
    echo "E2E-DUP request=$((i - 1)) at=$t0"
  done
  now
  gap=$(((NOW - t0) * 10))
  if [ "$reply" != "REQ $i" ]; then echo "E2E-ERROR request $i: answered '$reply'"; break; fi
  answered=$i
  [ "$gap" -gt "$worst" ] && worst=$gap
  [ "$gap" -ge "$slow" ] && echo "E2E-GAP request=$i at=$t0 ms=$gap"
done
echo "E2E-LOOP-END at=$NOW"
touch /tmp/stop
kill "$stopper" 2>/dev/null
wait "$counter"
echo "E2E-METRIC requests=$i answered=$answered duplicates=$dups worst_gap_ms=$worst counter_last=$(cat /tmp/counter_last)"
if [ "$MIB" -gt 0 ]; then
  wait "$g2h" "$h2g"
  echo "E2E-METRIC in_bytes=$(wc -c </tmp/in) in_sha=$(sha256sum </tmp/in | cut -d' ' -f1) out_sha=$(sha256sum </tmp/out | cut -d' ' -f1)"
  echo BACK >&5
  cat /tmp/in /tmp/out >&5
  read -r _ <&4
  exec 5<&- 6<&-
fi
exec 3<&- 4<&-
[ "$i" -gt 0 ] && [ "$answered" = "$i" ]
