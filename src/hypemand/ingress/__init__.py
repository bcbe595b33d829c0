"""Ingress: HTTP(S) routes from the outside to instances, served by Caddy in the VM network's
namespace and resolved to instances' addresses at request time. See README.md beside this file."""
