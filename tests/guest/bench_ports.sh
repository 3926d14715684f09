# `vhostser bench` ports8 and idle: $E2E_NPORTS ports (org.vhostser.bench.1..N) at once, each
# moving $E2E_COUNT x $E2E_BS bytes both ways at the same time, $E2E_RUNS times.
# Per port: open, write "O" (the host may start); per run: read the host's "G", then one dd
# each way, then "A" after the last byte. Between "O" and the first "G" the guest is idle.
. /tests/_lib.sh
BS=${E2E_BS:-65536}; CNT=${E2E_COUNT:-256}; RUNS=${E2E_RUNS:-3}; N=${E2E_NPORTS:-8}
port() {
  P=/dev/virtio-ports/org.vhostser.bench.$1
  [ -e "$P" ] || { echo "E2E-ERROR $P missing"; exit 1; }
  exec 3<>"$P" || exit 1
  printf O >&3
  i=1
  while [ $i -le $RUNS ]; do
    dd bs=1 count=1 <&3 of=/dev/null 2>/dev/null || exit 2
    dd if=/dev/zero bs=$BS count=$CNT >&3 2>/dev/null &
    dd bs=$BS count=$CNT iflag=fullblock <&3 of=/dev/null 2>/dev/null || exit 3
    wait $! || exit 4
    printf A >&3
    i=$((i+1))
  done
}
pids=""
p=1
while [ $p -le $N ]; do port $p & pids="$pids $!"; p=$((p+1)); done
rc=0
for pid in $pids; do wait $pid || rc=1; done
echo "E2E-METRIC ports=$N runs=$RUNS bytes_each_way=$((BS*CNT)) rc=$rc"
exit $rc
