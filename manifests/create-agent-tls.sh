#!/usr/bin/env bash
# Creates the Secret berth's node agents use for mutual TLS, which the Helm chart generates by
# itself but plain manifests cannot: a private CA (ca.crt) and one certificate and key
# (tls.crt, tls.key) for the fixed name "berth-agent", valid for server and client auth.
# Agents verify each other against ca.crt and that name.
#
#   manifests/create-agent-tls.sh [NAMESPACE [SECRET]]   default berth-system berth-agent-tls
#   manifests/create-agent-tls.sh --print [...]          write the Secret to stdout instead
#
# An existing Secret is left alone, so the script can run again safely. Needs openssl and,
# unless --print, kubectl. VALIDITY_DAYS (default 3650) sets the certificates' lifetime.
set -euo pipefail

print=false
if [ "${1:-}" = --print ]; then
  print=true
  shift
fi
namespace=${1:-berth-system}
name=${2:-berth-agent-tls}
days=${VALIDITY_DAYS:-3650}

if ! $print && kubectl -n "$namespace" get secret "$name" >/dev/null 2>&1; then
  echo "secret $namespace/$name exists; left as it is" >&2
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj /CN=berth-agent-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=berth-agent -keyout tls.key -out tls.csr 2>/dev/null
cat >ext.cnf <<'EOF'
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:berth-agent
EOF
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -extfile ext.cnf -out tls.crt 2>/dev/null
openssl verify -CAfile ca.crt -verify_hostname berth-agent tls.crt >/dev/null

secret=$(
  cat <<EOF
apiVersion: v1
kind: Secret
metadata:
  name: $name
  namespace: $namespace
  labels:
    app.kubernetes.io/name: berth
    app.kubernetes.io/part-of: berth
type: kubernetes.io/tls
data:
  ca.crt: $(base64 -w0 ca.crt)
  tls.crt: $(base64 -w0 tls.crt)
  tls.key: $(base64 -w0 tls.key)
EOF
)
if $print; then
  echo "$secret"
else
  echo "$secret" | kubectl create -f -
fi
