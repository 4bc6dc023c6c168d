#!/usr/bin/env bash
# Creates what berth's agents need for mutual TLS, which the Helm chart generates by itself
# but plain manifests cannot: a private CA and the controller's certificate of it.
#   CA_SECRET (default berth-ca): the CA (ca.crt, ca.key). Only the controller mounts it: it
#     signs each node plugin's own certificate (<node>.node.berth and berth-agent) when the
#     plugin asks through a Kubernetes CertificateSigningRequest.
#   CONTROLLER_SECRET (default berth-controller-tls): the controller's certificate (ca.crt,
#     tls.crt, tls.key), named controller.berth, the only identity agents take commands
#     from; client auth only.
#   CA_CONFIGMAP (default berth-agent-ca): the CA certificate alone (ca.crt), for the nodes.
# The CA key is PKCS#8 ("PRIVATE KEY"), the form berth's signer reads.
#
#   manifests/create-agent-tls.sh [NAMESPACE [CA_SECRET [CONTROLLER_SECRET [CA_CONFIGMAP]]]]
#   manifests/create-agent-tls.sh --print [...]   write the objects to stdout instead
#
# Existing objects are left alone, so the script can run again safely. Needs openssl and,
# unless --print, kubectl. VALIDITY_DAYS (default 3650) sets the CA's and the controller
# certificate's lifetime.
set -euo pipefail

print=false
if [ "${1:-}" = --print ]; then
  print=true
  shift
fi
namespace=${1:-berth-system}
ca_name=${2:-berth-ca}
controller_name=${3:-berth-controller-tls}
configmap_name=${4:-berth-agent-ca}
days=${VALIDITY_DAYS:-3650}

if ! $print && kubectl -n "$namespace" get secret "$ca_name" >/dev/null 2>&1; then
  echo "secret $namespace/$ca_name exists; left as it is (with $controller_name, $configmap_name)" >&2
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
openssl genpkey -algorithm ed25519 -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -days "$days" -subj "/CN=berth cluster CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=berth controller" -keyout controller.key \
  -out controller.csr 2>/dev/null
cat >controller.cnf <<EOT
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = DNS:controller.berth
EOT
openssl x509 -req -in controller.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -extfile controller.cnf -out controller.crt 2>/dev/null
openssl verify -CAfile ca.crt -purpose sslclient -verify_hostname controller.berth \
  controller.crt >/dev/null

labels() { # labels COMPONENT
  cat <<EOT
  labels:
    app.kubernetes.io/name: berth
    app.kubernetes.io/part-of: berth
    app.kubernetes.io/component: $1
EOT
}
objects=$(
  cat <<EOT
apiVersion: v1
kind: Secret
metadata:
  name: $ca_name
  namespace: $namespace
$(labels controller)
type: Opaque
data:
  ca.crt: $(base64 -w0 ca.crt)
  ca.key: $(base64 -w0 ca.key)
---
apiVersion: v1
kind: Secret
metadata:
  name: $controller_name
  namespace: $namespace
$(labels controller)
type: kubernetes.io/tls
data:
  ca.crt: $(base64 -w0 ca.crt)
  tls.crt: $(base64 -w0 controller.crt)
  tls.key: $(base64 -w0 controller.key)
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: $configmap_name
  namespace: $namespace
$(labels node)
data:
  ca.crt: |
$(sed 's/^/    /' ca.crt)
EOT
)
if $print; then
  echo "$objects"
else
  echo "$objects" | kubectl create -f -
fi
