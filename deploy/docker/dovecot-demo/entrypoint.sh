#!/bin/sh
# Make a self-signed certificate for the name "dovecot-demo" on first start,
# publish it in /demo-pki (a volume the exporter mounts to verify it), then
# run Dovecot in the foreground. Arguments are passed on to dovecot, e.g.
# "-o listen=127.0.0.1" to override a setting of demo.conf.
set -eu
key=/etc/dovecot/private/dovecot-demo.key
cert=/demo-pki/dovecot-demo.crt
mkdir -p /etc/dovecot/private /demo-pki
if [ ! -s "$key" ] || [ ! -s "$cert" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 \
        -subj "/CN=dovecot-demo" \
        -addext "subjectAltName=DNS:dovecot-demo,DNS:localhost" \
        -keyout "$key" -out "$cert"
    chmod 0600 "$key"
    chmod 0644 "$cert"
fi
exec dovecot -F -c /etc/dovecot/demo.conf "$@"
