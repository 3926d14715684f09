# The example VM of examples/web1.toml: the guest uses every port, then idles while the host
# checks and stops the daemon.
. /tests/_lib.sh
exec 3<>"$(e2e_hvc)"; e2e_raw 3
# Kernel messages reach hvc0 live from the moment virtio_console registers it (console=hvc0);
# what the kernel printed before that, the guest sends itself, as a getty's issue would.
dmesg >&3
echo "hello console from the example VM" >&3
exec 4<>/dev/virtio-ports/org.qemu.guest_agent.0 || exit 1
exec 5<>/dev/virtio-ports/com.redhat.spice.0 || exit 2
echo "log line from the guest" > /dev/virtio-ports/org.example.log || exit 3
echo '{"execute":"guest-ping"}' >&4
echo "E2E-READY"
sleep "${E2E_IDLE:-60}"
