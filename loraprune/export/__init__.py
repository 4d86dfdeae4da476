"""What leaves the process: save/load/inspect, export classes, PEFT adapters, GGUF read and write."""
