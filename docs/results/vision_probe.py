"""The stage-0 probe of docs/world.md: train a CLIP-style tower alone on the bag of words of the world's alignment
captions and report held-out shape and colour word accuracy (how well the tower tells shapes apart).

    python docs/results/vision_probe.py WORLD_DIR HIDDEN LAYERS PATCH STEPS LR [SIZE]
    e.g. python docs/results/vision_probe.py ~/.cache/mmcl/world-seed0 64 2 8 2400 4e-3
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

torch.set_num_threads(1)
W = Path(sys.argv[1]); hidden=int(sys.argv[2]); layers=int(sys.argv[3]); patch=int(sys.argv[4]); steps=int(sys.argv[5]); lr=float(sys.argv[6]); size=int(sys.argv[7]) if len(sys.argv)>7 else 64
def load(split):
    recs=[json.loads(l) for l in open(W/'tasks/align'/f'{split}.jsonl')]
    X=torch.stack([torch.from_numpy(np.asarray(Image.open(W/'tasks/align'/r['image']).convert('RGB').resize((size,size)),dtype=np.float32)/127.5-1).permute(2,0,1) for r in recs])
    return X,[r['conversations'][1]['value'] for r in recs]
Xtr,Ctr=load('train'); Xte,Cte=load('test')
words=sorted({w for c in Ctr for w in c.split()}); ix={w:i for i,w in enumerate(words)}
def T(C):
    t=torch.zeros(len(C),len(words))
    for i,c in enumerate(C):
        for w in c.split():
            if w in ix: t[i,ix[w]]=1
    return t
Ytr=T(Ctr)
torch.manual_seed(0)
enc=CLIPVisionModel(CLIPVisionConfig(hidden_size=hidden,intermediate_size=2*hidden,num_hidden_layers=layers,num_attention_heads=4,image_size=size,patch_size=patch))
head=torch.nn.Linear(hidden,len(words)); opt=torch.optim.AdamW(list(enc.parameters())+list(head.parameters()),lr=lr)
g=torch.Generator().manual_seed(0); t0=time.time()
for s in range(steps):
    idx=torch.randint(0,len(Xtr),(32,),generator=g)
    f=enc(Xtr[idx]).last_hidden_state[:,1:].mean(1)
    loss=torch.nn.functional.binary_cross_entropy_with_logits(head(f),Ytr[idx]); loss.backward(); opt.step(); opt.zero_grad()
enc.eval()
with torch.no_grad(): L=head(enc(Xte).last_hidden_state[:,1:].mean(1))
shapes=['circle','square','triangle','star','cross','diamond']; cols=['red','green','blue','yellow','purple','orange']
def acc(vocab):
    ok=n=0
    for i,c in enumerate(Cte):
        gold=[w for w in c.split() if w.rstrip('s').replace('crosse','cross') in vocab]
        if not gold: continue
        cand=[w for w in vocab if w in ix]
        pred=max(cand,key=lambda w:L[i,ix[w]]); ok+=pred==gold[0].rstrip('s').replace('crosse','cross'); n+=1
    return round(100*ok/max(n,1),1)
print(f"h{hidden} l{layers} p{patch} s{steps} lr{lr} size{size}: loss {loss.item():.3f} shape {acc(shapes)} colour {acc(cols)} ({time.time()-t0:.0f}s)",flush=True)
