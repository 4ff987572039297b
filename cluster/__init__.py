"""Scripts that start Ray on each Mac of an Orchard cluster (see cluster/README.md)."""
