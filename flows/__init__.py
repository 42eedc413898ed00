"""trtflow's Prefect flow and command line."""
