# The guest side of a host peer across a daemon restart: $E2E_MIB MiB (default 64) from the
# host peer on org.test.data, read byte-exact; "R" when the port is open, "SHA <sha256>" back
# on the same port at the end.
. /tests/_lib.sh
P=/dev/virtio-ports/org.test.data
[ -e "$P" ] || { echo "E2E-ERROR $P missing"; exit 1; }
MIB=${E2E_MIB:-64}
exec 3<>"$P"
echo R >&3
dd iflag=fullblock bs=65536 count=$((MIB * 16)) <&3 of=/tmp/in 2>/dev/null
n=$(wc -c </tmp/in)
sha=$(sha256sum </tmp/in | cut -d' ' -f1)
echo "SHA $sha" >&3
echo "E2E-METRIC bytes=$n sha=$sha"
[ "$n" = $((MIB << 20)) ]
