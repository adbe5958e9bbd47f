"""The command line and the tools around it: cli, bench, doctor, the scripts/ directory."""
