"""Kubernetes (KubeRay) manifests and the script that renders their Serve config; see docs/kubernetes.md."""
