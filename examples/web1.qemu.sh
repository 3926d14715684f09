#!/bin/sh
# QEMU (>= 10.2) for the VM of web1.toml. Guest RAM must be shared with vhostser
# (memfd, share=on); vhostser listens first (systemctl start vhostser@web1.socket),
# QEMU connects, and reconnects within 1 s if the daemon restarts.
exec qemu-system-x86_64 \
    -machine q35,accel=kvm,memory-backend=mem -cpu host -m 2G -smp 2 \
    -object memory-backend-memfd,id=mem,size=2G,share=on \
    -chardev socket,id=vhostser0,path=/run/vhostser/web1.sock,reconnect-ms=1000 \
    -device vhost-user-test-device-pci,chardev=vhostser0,virtio-id=3,num_vqs=10,config_size=12 \
    -drive file=/var/lib/images/web1.qcow2,if=virtio \
    "$@"
