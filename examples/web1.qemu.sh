#!/bin/sh
# QEMU (>= 10.2) for the VM of web1.toml. Guest RAM must be shared with vhostser
# (memfd, share=on); the socket must exist first (systemctl start vhostser@web1.socket),
# QEMU connects to it. No reconnect-ms on the chardev: QEMU 11.1's generic vhost-user
# device then fails to start (see the README, "QEMU caveats").
exec qemu-system-x86_64 \
    -machine q35,accel=kvm,memory-backend=mem -cpu host -m 2G -smp 2 \
    -object memory-backend-memfd,id=mem,size=2G,share=on \
    -chardev socket,id=vhostser0,path=/run/vhostser/web1.sock \
    -device vhost-user-test-device-pci,chardev=vhostser0,virtio-id=3,num_vqs=10,config_size=12 \
    -drive file=/var/lib/images/web1.qcow2,if=virtio \
    "$@"
