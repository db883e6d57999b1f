#!/bin/bash
# DDP check (GPUs G1 for one, G2 for two; default 0 and 0,1): the BUSI recipe for 20 epochs on one GPU
# and on two (torchrun, NCCL), both eager (CUDA graphs are off under DDP), batch 8 global.
set -u
export PYTHONUNBUFFERED=1
C="training/run_train.py training/recipes/busi_prosma.toml --data-root _device/data --epochs 20 --set final_eval=false --set cuda_graphs=false --set val_every=100 --no-resume"
s=$(date +%s%N); CUDA_VISIBLE_DEVICES=${G1:-0} python3 $C --out _device/ddp1 > _device/logs/ddp_1gpu.log 2>&1; rc=$?; e=$(date +%s%N)
echo "ddp 1gpu rc=$rc wall_ms $(( (e - s) / 1000000 )) | $(grep img/s _device/logs/ddp_1gpu.log | tail -n 1)"
s=$(date +%s%N); CUDA_VISIBLE_DEVICES=${G2:-0,1} python3 -m torch.distributed.run --standalone --nproc_per_node=2 $C --out _device/ddp2 > _device/logs/ddp_2gpu.log 2>&1; rc=$?; e=$(date +%s%N)
echo "ddp 2gpu rc=$rc wall_ms $(( (e - s) / 1000000 )) | $(grep img/s _device/logs/ddp_2gpu.log | tail -n 1)"
