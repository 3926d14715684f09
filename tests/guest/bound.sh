# The virtio-console device served by vhostser is bound by Linux's driver and DRIVER_OK is set;
# then a line goes out through the console port (hvc0) so the host can see the data path work.
. /tests/_lib.sh
d=""
for v in /sys/bus/virtio/devices/virtio*; do
  [ "$(cat "$v/device")" = 0x0003 ] && d=$v
done
[ -n "$d" ] || { echo "E2E-ERROR no virtio console device"; exit 1; }
drv=$(basename "$(readlink "$d/driver")")
status=$(cat "$d/status")
echo "E2E-METRIC driver=$drv status=$status features=$(cat "$d/features")"
[ "$drv" = virtio_console ] || exit 2
# DRIVER_OK is bit 2 (0x4) of the virtio device status
[ $(( status & 4 )) = 4 ] || exit 3
exec 3<>"$(e2e_hvc)"; e2e_raw 3
echo "${E2E_TOKEN:-hello} from the guest console" >&3
sleep 0.2
