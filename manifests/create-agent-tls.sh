#!/usr/bin/env bash
# Creates the Secrets berth's agents use for mutual TLS, which the Helm chart generates by
# itself but plain manifests cannot: a private CA (ca.crt) and two certificates of it, each
# with its key (tls.crt, tls.key), valid for server and client auth:
#   NODE_SECRET (default berth-agent-tls): the certificate every node plugin shares, with the
#     DNS names berth-agent (what a client checks an agent's chain against) and node.berth
#     (its identity: some node);
#   CONTROLLER_SECRET (default berth-controller-tls): the controller's, named
#     controller.berth, the only identity agents take commands from.
# The CA's key is deleted: nothing can issue more certificates.
#
#   manifests/create-agent-tls.sh [NAMESPACE [NODE_SECRET [CONTROLLER_SECRET]]]
#   manifests/create-agent-tls.sh --print [...]   write the Secrets to stdout instead
#
# Existing Secrets are left alone, so the script can run again safely. Needs openssl and,
# unless --print, kubectl. VALIDITY_DAYS (default 3650) sets the certificates' lifetime.
set -euo pipefail

print=false
if [ "${1:-}" = --print ]; then
  print=true
  shift
fi
namespace=${1:-berth-system}
node_name=${2:-berth-agent-tls}
controller_name=${3:-berth-controller-tls}
days=${VALIDITY_DAYS:-3650}

if ! $print && kubectl -n "$namespace" get secret "$node_name" >/dev/null 2>&1; then
  echo "secret $namespace/$node_name exists; left as it is (with $controller_name)" >&2
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=berth cluster CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout ca.key -out ca.crt 2>/dev/null
issue() { # issue NAME CN SANS
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  cat >"$1.cnf" <<EOT
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $3
EOT
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.cnf" -out "$1.crt" 2>/dev/null
}
issue node "berth node" DNS:berth-agent,DNS:node.berth
issue controller "berth controller" DNS:controller.berth
openssl verify -CAfile ca.crt -verify_hostname berth-agent node.crt >/dev/null
openssl verify -CAfile ca.crt -verify_hostname controller.berth controller.crt >/dev/null
rm ca.key

secret() { # secret NAME FILE COMPONENT
  cat <<EOT
apiVersion: v1
kind: Secret
metadata:
  name: $1
  namespace: $namespace
  labels:
    app.kubernetes.io/name: berth
    app.kubernetes.io/part-of: berth
    app.kubernetes.io/component: $3
type: kubernetes.io/tls
data:
  ca.crt: $(base64 -w0 ca.crt)
  tls.crt: $(base64 -w0 "$2.crt")
  tls.key: $(base64 -w0 "$2.key")
EOT
}
secrets=$(
  secret "$node_name" node node
  echo ---
  secret "$controller_name" controller controller
)
if $print; then
  echo "$secrets"
else
  echo "$secrets" | kubectl create -f -
fi
