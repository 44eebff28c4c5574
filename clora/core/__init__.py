"""The bottom layer: what every stage shares and no stage owns. Imports only `clora.wire`."""
