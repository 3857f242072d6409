"""Outside the cluster: launches and watches trainer containers through the Docker SDK."""
