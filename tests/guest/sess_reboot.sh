# Runs on every boot of a guest the host resets (QMP system_reset): holds the echo, data and
# framed ports open and waits for the host's word on org.vhostser.data ("done" ends the test).
. /tests/_lib.sh
V=/dev/virtio-ports
exec 3<>$V/org.vhostser.echo 4<>$V/org.vhostser.data 5<>$V/org.vhostser.framed || exit 2
echo ping >&3; read -r e <&3
echo "E2E-MARK reboot-holding boot=$(cat /proc/sys/kernel/random/boot_id) echo=$e"
read -r cmd <&4
echo "E2E-METRIC echo=$e cmd=$cmd"
[ "$e" = ping ] && [ "$cmd" = done ]
