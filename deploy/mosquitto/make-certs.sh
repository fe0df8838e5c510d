#!/usr/bin/env bash
# Makes a CA and a server certificate for the broker (ECDSA P-256), for fleets
# without a PKI of their own.
#
#   deploy/mosquitto/make-certs.sh OUT_DIR NAME...
#
# NAMEs are the host names and IP addresses agents use to reach the broker;
# the first is also the certificate's common name. Writes ca.crt (give it to
# hub and agents with --broker-ca), ca.key (keep it offline), server.crt and
# server.key (for Mosquitto). An existing CA in OUT_DIR is reused, so running
# it again with new NAMEs renews only the server certificate.
set -euo pipefail
die() { echo "make-certs: $*" >&2; exit 1; }
(($# >= 2)) || { sed -n '2,12p' "$0"; exit 2; }
out=$1; shift
command -v openssl >/dev/null || die "openssl is needed (Debian: apt-get install openssl)"
mkdir -p "$out"
umask 077
san=""
for n in "$@"; do
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,";
    elif [[ $n =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then san+="DNS:$n,";
    else die "'$n' is neither a host name nor an IP address"; fi
done
if [[ ! -f $out/ca.key ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=edge broker CA" -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days 825 -out "$out/server.crt" \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n' "${san%,}") 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 0644 "$out/ca.crt" "$out/server.crt"
echo "make-certs: $out/ca.crt (for --broker-ca), $out/server.crt and server.key (for Mosquitto), valid for: $*"
