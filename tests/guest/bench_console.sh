# `vhostser bench` console: $E2E_RUNS times, $E2E_COUNT x $E2E_BS zero bytes written to the
# console port's tty /dev/hvc0 (raw, one fd kept open: hvc resets the tty on last close).
. /tests/_lib.sh
BS=${E2E_BS:-65536}; CNT=${E2E_COUNT:-256}; RUNS=${E2E_RUNS:-3}
exec 3<>"$(e2e_hvc)" || exit 1
e2e_raw 3
i=1
while [ $i -le $RUNS ]; do
  t0=$(e2e_now)
  dd if=/dev/zero bs=$BS count=$CNT >&3 2>/tmp/dd.err || { cat /tmp/dd.err; exit 2; }
  t1=$(e2e_now)
  echo "E2E-METRIC console run=$i bytes=$((BS*CNT)) t0=$t0 t1=$t1"
  i=$((i+1))
done
